// tests/testing/nbd_test_client.cc — NBD byte-stream builders for tests.
#include "tests/testing/nbd_test_client.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/errno_text.h"

namespace blockmeta {
namespace nbd {
namespace testing {

std::string ClientFlags(uint32_t flags) {
  std::string s;
  AppendBe32(&s, flags);
  return s;
}

std::string Option(uint32_t opt, const std::string& data) {
  std::string s;
  AppendBe64(&s, kIHaveOpt);
  AppendBe32(&s, opt);
  AppendBe32(&s, static_cast<uint32_t>(data.size()));
  return s + data;
}

std::string GoData(const std::string& name,
                   const std::vector<uint16_t>& infos) {
  std::string s;
  AppendBe32(&s, static_cast<uint32_t>(name.size()));
  s += name;
  AppendBe16(&s, static_cast<uint16_t>(infos.size()));
  for (uint16_t i : infos) AppendBe16(&s, i);
  return s;
}

std::string MetaData(const std::string& name,
                     const std::vector<std::string>& queries) {
  std::string s;
  AppendBe32(&s, static_cast<uint32_t>(name.size()));
  s += name;
  AppendBe32(&s, static_cast<uint32_t>(queries.size()));
  for (const std::string& q : queries) {
    AppendBe32(&s, static_cast<uint32_t>(q.size()));
    s += q;
  }
  return s;
}

std::vector<OptReply> ParseOptReplies(const std::string& out,
                                      std::string* rest) {
  std::vector<OptReply> replies;
  size_t pos = out.size() >= 18 ? 18 : out.size();
  const auto* p = reinterpret_cast<const uint8_t*>(out.data());
  while (out.size() - pos >= 20 && GetBe64(p + pos) == kOptReplyMagic) {
    uint32_t len = GetBe32(p + pos + 16);
    if (out.size() - pos - 20 < len) break;
    replies.push_back({GetBe32(p + pos + 8), GetBe32(p + pos + 12),
                       out.substr(pos + 20, len)});
    pos += 20 + len;
  }
  if (rest != nullptr) *rest = out.substr(pos);
  return replies;
}

RawClient::RawClient(int fd, absl::Duration timeout)
    : fd_(fd), timeout_(timeout), stream_(fd) {}

RawClient::~RawClient() { close(fd_); }

absl::StatusOr<std::unique_ptr<RawClient>> RawClient::ConnectUnix(
    const std::string& path, absl::Duration timeout) {
  struct sockaddr_un sa = {};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) {
    return absl::InvalidArgumentError("path too long");
  }
  memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 ||
      connect(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa) != 0) {
    absl::Status s =
        absl::UnavailableError(absl::StrCat("connect: ", ErrnoText(errno)));
    if (fd >= 0) close(fd);
    return s;
  }
  return std::unique_ptr<RawClient>(new RawClient(fd, timeout));
}

absl::StatusOr<std::unique_ptr<RawClient>> RawClient::ConnectTcp(
    int port, absl::Duration timeout) {
  struct sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 ||
      connect(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa) != 0) {
    absl::Status s =
        absl::UnavailableError(absl::StrCat("connect: ", ErrnoText(errno)));
    if (fd >= 0) close(fd);
    return s;
  }
  return std::unique_ptr<RawClient>(new RawClient(fd, timeout));
}

absl::Status RawClient::Send(const std::string& bytes) {
  return stream_.WriteAll(bytes);
}

absl::StatusOr<std::string> RawClient::Read(size_t n) {
  std::string s(n, '\0');
  stream_.SetReadDeadline(absl::Now() + timeout_);
  absl::Status st = stream_.ReadFull(s.data(), n);
  if (!st.ok()) return st;
  return s;
}

bool RawClient::WaitForClose() {
  const absl::Time deadline = absl::Now() + timeout_;
  char buf[4096];
  while (absl::Now() < deadline) {
    struct pollfd pfd = {fd_, POLLIN, 0};
    int r = poll(&pfd, 1, 100);
    if (r <= 0) continue;
    ssize_t got = recv(fd_, buf, sizeof buf, 0);
    if (got == 0) return true;
    if (got < 0 && errno != EINTR && errno != EAGAIN) return true;  // reset
  }
  return false;
}

void RawClient::HangUp() { shutdown(fd_, SHUT_WR); }

absl::StatusOr<RawClient::Result> RawClient::Handshake(
    const std::string& export_name, bool structured,
    const std::vector<std::string>& contexts) {
  absl::StatusOr<std::string> greeting = Read(18);
  if (!greeting.ok()) return greeting.status();
  std::string out = ClientFlags();
  int expected_finals = 1;
  if (structured) {
    out += Option(kOptStructuredReply);
    ++expected_finals;
    if (!contexts.empty()) {
      out += Option(kOptSetMetaContext, MetaData(export_name, contexts));
      ++expected_finals;
    }
  }
  out += Option(kOptGo, GoData(export_name, {kInfoBlockSize}));
  if (absl::Status s = Send(out); !s.ok()) return s;
  Result result;
  int finals = 0;
  while (finals < expected_finals) {
    absl::StatusOr<std::string> hdr = Read(20);
    if (!hdr.ok()) return hdr.status();
    const auto* p = reinterpret_cast<const uint8_t*>(hdr->data());
    if (GetBe64(p) != kOptReplyMagic) {
      return absl::InternalError("bad option reply magic");
    }
    OptReply r{GetBe32(p + 8), GetBe32(p + 12), ""};
    absl::StatusOr<std::string> data = Read(GetBe32(p + 16));
    if (!data.ok()) return data.status();
    r.data = *data;
    if (r.type == kRepAck || (r.type & kRepErrBit)) ++finals;
    if (r.opt == kOptGo && (r.type & kRepErrBit)) {
      return absl::NotFoundError(absl::StrCat("GO refused: ", r.type));
    }
    if (r.opt == kOptGo && r.type == kRepInfo && r.data.size() == 12 &&
        GetBe16(reinterpret_cast<const uint8_t*>(r.data.data())) ==
            kInfoExport) {
      result.size =
          GetBe64(reinterpret_cast<const uint8_t*>(r.data.data()) + 2);
      result.flags =
          GetBe16(reinterpret_cast<const uint8_t*>(r.data.data()) + 10);
    }
    result.replies.push_back(std::move(r));
  }
  return result;
}

absl::StatusOr<RawClient::Reply> RawClient::ReadReply(
    uint32_t simple_read_length) {
  Reply reply;
  for (;;) {
    absl::StatusOr<std::string> magic = Read(4);
    if (!magic.ok()) return magic.status();
    uint32_t m = GetBe32(reinterpret_cast<const uint8_t*>(magic->data()));
    if (m == kSimpleReplyMagic) {
      absl::StatusOr<std::string> rest = Read(12);
      if (!rest.ok()) return rest.status();
      const auto* p = reinterpret_cast<const uint8_t*>(rest->data());
      reply.error = GetBe32(p);
      reply.handle = GetBe64(p + 4);
      if (reply.error == 0 && simple_read_length > 0) {
        absl::StatusOr<std::string> data = Read(simple_read_length);
        if (!data.ok()) return data.status();
        reply.data = *data;
      }
      return reply;
    }
    if (m != kStructuredReplyMagic) {
      return absl::InternalError(absl::StrCat("bad reply magic ", m));
    }
    absl::StatusOr<std::string> rest = Read(16);
    if (!rest.ok()) return rest.status();
    const auto* p = reinterpret_cast<const uint8_t*>(rest->data());
    Chunk c{GetBe16(p), GetBe16(p + 2), ""};
    reply.handle = GetBe64(p + 4);
    absl::StatusOr<std::string> data = Read(GetBe32(p + 12));
    if (!data.ok()) return data.status();
    c.data = *data;
    if ((c.type & 0x8000) && c.data.size() >= 4 && reply.error == 0) {
      reply.error = GetBe32(reinterpret_cast<const uint8_t*>(c.data.data()));
    }
    const bool done = (c.flags & kReplyFlagDone) != 0;
    reply.chunks.push_back(std::move(c));
    if (done) return reply;
  }
}

absl::StatusOr<RawClient::Reply> RawClient::Call(const Request& r,
                                                 const std::string& payload,
                                                 uint32_t simple_read_length) {
  if (absl::Status s = Send(RequestBytes(r, payload)); !s.ok()) return s;
  return ReadReply(simple_read_length);
}

Descriptors DecodeBlockStatus(const std::string& d) {
  Descriptors out;
  const auto* p = reinterpret_cast<const uint8_t*>(d.data());
  if (d.size() < 4) return out;
  out.context_id = GetBe32(p);
  for (size_t i = 4; i + 8 <= d.size(); i += 8) {
    out.extents.emplace_back(GetBe32(p + i), GetBe32(p + i + 4));
  }
  return out;
}

}  // namespace testing
}  // namespace nbd
}  // namespace blockmeta
