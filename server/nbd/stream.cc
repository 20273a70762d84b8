// server/nbd/stream.cc — ByteStream implementations (socket and memory).
#include "server/nbd/stream.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/errno_text.h"

namespace blockmeta {
namespace nbd {

absl::Status ByteStream::Discard(uint64_t n) {
  char buf[16384];
  while (n > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, sizeof buf));
    absl::Status s = ReadFull(buf, chunk);
    if (!s.ok()) return s;
    n -= chunk;
  }
  return absl::OkStatus();
}

FdStream::~FdStream() {
  if (owns_ && fd_ >= 0) close(fd_);
}

absl::Status FdStream::WaitFor(int16_t events, absl::Time deadline) {
  for (;;) {
    int timeout_ms = -1;
    if (deadline != absl::InfiniteFuture()) {
      absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) {
        return absl::DeadlineExceededError(events == POLLIN
                                               ? "read deadline passed"
                                               : "write deadline passed");
      }
      timeout_ms = static_cast<int>(
          std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1 << 30));
    }
    struct pollfd pfd = {fd_, events, 0};
    int r = poll(&pfd, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return absl::UnavailableError(ErrnoText(errno));
    if (r > 0) return absl::OkStatus();  // ready, or an error recv/send sees
  }
}

absl::StatusOr<size_t> FdStream::ReadSome(void* buf, size_t n) {
  for (;;) {
    ssize_t r = recv(fd_, buf, n, MSG_DONTWAIT);
    if (r >= 0) return static_cast<size_t>(r);
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return absl::UnavailableError(absl::StrCat("recv: ", ErrnoText(errno)));
    }
    if (absl::Status s = WaitFor(POLLIN, read_deadline_); !s.ok()) return s;
  }
}

absl::StatusOr<size_t> FdStream::TryRead(void* buf, size_t n) {
  for (;;) {
    ssize_t r = recv(fd_, buf, n, MSG_DONTWAIT);
    if (r > 0) return static_cast<size_t>(r);
    if (r == 0) return absl::UnavailableError("peer closed the connection");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return size_t{0};
    return absl::UnavailableError(absl::StrCat("recv: ", ErrnoText(errno)));
  }
}

absl::StatusOr<size_t> FdStream::WriteSome(const void* buf, size_t n) {
  for (;;) {
    absl::StatusOr<size_t> w = TryWrite(buf, n);
    if (!w.ok() || *w > 0 || n == 0) return w;
    if (absl::Status s = WaitFor(POLLOUT, write_deadline_); !s.ok()) return s;
  }
}

absl::StatusOr<size_t> FdStream::TryWrite(const void* buf, size_t n) {
  for (;;) {
    ssize_t r = send(fd_, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) return static_cast<size_t>(r);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return size_t{0};
    return absl::UnavailableError(absl::StrCat("send: ", ErrnoText(errno)));
  }
}

absl::Status FdStream::ReadFull(void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    absl::StatusOr<size_t> r = ReadSome(p, n);
    if (!r.ok()) return r.status();
    if (*r == 0) return absl::UnavailableError("peer closed the connection");
    p += *r;
    n -= *r;
  }
  return absl::OkStatus();
}

absl::Status FdStream::WriteAll(const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    absl::StatusOr<size_t> r = WriteSome(p, n);
    if (!r.ok()) return r.status();
    p += *r;
    n -= *r;
  }
  return absl::OkStatus();
}

absl::Status MemoryStream::ReadFull(void* buf, size_t n) {
  if (input_.size() - pos_ < n) {
    pos_ = input_.size();
    return absl::UnavailableError("end of input");
  }
  if (n > 0) memcpy(buf, input_.data() + pos_, n);
  pos_ += n;
  return absl::OkStatus();
}

absl::Status MemoryStream::WriteAll(const void* buf, size_t n) {
  output_.append(static_cast<const char*>(buf), n);
  return absl::OkStatus();
}

}  // namespace nbd
}  // namespace blockmeta
