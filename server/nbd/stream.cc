// server/nbd/stream.cc — ByteStream implementations (socket and memory).
#include "server/nbd/stream.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

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

absl::Status FdStream::ReadFull(void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    if (deadline_ != absl::InfiniteFuture()) {
      absl::Duration left = deadline_ - absl::Now();
      if (left <= absl::ZeroDuration()) {
        return absl::DeadlineExceededError("read deadline passed");
      }
      struct pollfd pfd = {fd_, POLLIN, 0};
      int64_t ms = absl::ToInt64Milliseconds(left) + 1;
      int r = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(ms, 1 << 30)));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return absl::UnavailableError(strerror(errno));
      if (r == 0) continue;  // re-check the deadline
    }
    ssize_t r = recv(fd_, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0)
      return absl::UnavailableError(absl::StrCat("recv: ", strerror(errno)));
    if (r == 0) return absl::UnavailableError("peer closed the connection");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::Status FdStream::WriteAll(const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = send(fd_, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0)
      return absl::UnavailableError(absl::StrCat("send: ", strerror(errno)));
    p += r;
    n -= static_cast<size_t>(r);
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
