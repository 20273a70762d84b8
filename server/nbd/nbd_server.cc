// server/nbd/nbd_server.cc — listener, accept loop and connection reaping.
#include "server/nbd/nbd_server.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/errno_text.h"
#include "server/common/log.h"
#include "server/common/unix_socket.h"

namespace blockmeta {
namespace {

nbd::ConnectionOptions OptionsFromConfig(
    const blockmeta::v1::NbdShimConfig& c) {
  nbd::ConnectionOptions o;  // the defaults' home (connection.h)
  if (c.handshake_timeout_ms() != 0) {
    o.handshake_timeout = absl::Milliseconds(c.handshake_timeout_ms());
  }
  if (c.max_payload_bytes() != 0) {
    o.handshake.max_payload_bytes = c.max_payload_bytes();
  }
  if (c.max_inflight_bytes_per_connection() != 0) {
    o.max_inflight_bytes = c.max_inflight_bytes_per_connection();
  }
  o.max_inflight_bytes = std::max<uint64_t>(
      o.max_inflight_bytes, 2ull * o.handshake.max_payload_bytes);
  if (c.idle_timeout_ms() != 0) {
    o.idle_timeout = absl::Milliseconds(c.idle_timeout_ms());
  }
  if (c.write_timeout_ms() != 0) {
    o.write_timeout = absl::Milliseconds(c.write_timeout_ms());
  }
  o.tls_verify_client = !c.tls().client_ca_file().empty();
  o.tls_require_client_cert = !c.tls().client_cert_optional();
  return o;
}

// `g` rounded up to a power of two, at least 512 (coarser is always safe).
uint64_t PowerOfTwoAtLeast(uint64_t g) {
  uint64_t p = 512;
  while (p < g && p < (1ull << 62)) p <<= 1;
  return p;
}

// Learned granularities are never finer than this: the host filesystem's
// blocks under an image change too (64 KiB covers common filesystems; it is
// also qemu's default qcow2 cluster size).
constexpr uint64_t kMinLearnedGranularity = 64u << 10;

}  // namespace

uint64_t ExportInvalidateGranularity(const blockmeta::v1::NbdShimConfig& c,
                                     const nbd::ShimExport& e) {
  const uint64_t configured = c.invalidate_granularity_bytes();
  uint64_t g =
      configured != 0 ? configured : nbd::kDefaultInvalidateGranularity;
  const std::shared_ptr<Upstream> up = e.upstream.lock();
  const uint64_t learned = up != nullptr ? up->ChangeGranularity() : 0;
  if (learned != 0) {
    // Learned from the image: exact. A configured value stays a floor.
    g = std::max(std::max(learned, kMinLearnedGranularity), configured);
  }
  if (up != nullptr) {
    if (absl::StatusOr<UpstreamInfo> info = up->Info(); info.ok()) {
      g = std::max<uint64_t>(g, info->minimum_block_size);
      g = std::max<uint64_t>(g, info->preferred_block_size);
    }
  }
  return PowerOfTwoAtLeast(g);
}

namespace {

absl::StatusOr<nbd::TlsMode> ParseTlsMode(const std::string& mode) {
  if (mode.empty() || mode == "off") return nbd::TlsMode::kOff;
  if (mode == "allow") return nbd::TlsMode::kAllow;
  if (mode == "require") return nbd::TlsMode::kRequire;
  return absl::InvalidArgumentError(
      absl::StrCat("nbd.tls.mode must be off, allow or require, not \"",
                   mode.substr(0, 32), "\""));
}

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", ErrnoText(errno)));
}

}  // namespace

blockmeta::v1::NbdShimConfig WithDefaultTlsFiles(
    blockmeta::v1::NbdShimConfig nbd, const blockmeta::v1::TlsConfig& tls) {
  blockmeta::v1::NbdTlsConfig* t = nbd.mutable_tls();
  if (t->cert_file().empty() && t->key_file().empty()) {
    t->set_cert_file(tls.cert_file());
    t->set_key_file(tls.key_file());
    if (t->client_ca_file().empty())
      t->set_client_ca_file(tls.client_ca_file());
  }
  return nbd;
}

NbdServer::NbdServer(std::vector<nbd::ShimExport> exports, ExtentCache* cache,
                     const blockmeta::v1::NbdShimConfig& config)
    : cache_(cache),
      config_(config),
      options_(OptionsFromConfig(config)),
      max_connections_(config.max_connections() != 0
                           ? config.max_connections()
                           : NbdServerDefaults::kMaxConnections),
      idle_eviction_grace_(
          config.no_idle_eviction()
              ? absl::InfiniteDuration()
              : absl::Milliseconds(
                    config.idle_eviction_grace_ms() != 0
                        ? config.idle_eviction_grace_ms()
                        : NbdServerDefaults::kIdleEvictionGraceMs)),
      pool_(config.worker_threads() != 0 ? config.worker_threads()
                                         : NbdServerDefaults::kWorkerThreads),
      budget_(config.max_inflight_bytes() != 0
                  ? config.max_inflight_bytes()
                  : NbdServerDefaults::kMaxInflightBytes) {
  SetExports(std::move(exports));
}

void NbdServer::SetExports(std::vector<nbd::ShimExport> exports) {
  for (nbd::ShimExport& e : exports) {
    e.invalidate_granularity = ExportInvalidateGranularity(config_, e);
  }
  std::sort(exports.begin(), exports.end(),
            [](const nbd::ShimExport& a, const nbd::ShimExport& b) {
              return a.name < b.name;
            });
  auto list = std::make_shared<const ExportList>(std::move(exports));
  sync::MutexLock lock(&mu_);
  exports_ = std::move(list);
}

size_t NbdServer::CloseExport(const std::string& name, absl::Duration wait) {
  std::vector<Slot*> closing;
  {
    sync::MutexLock lock(&mu_);
    for (auto& slot : slots_) {
      if (slot->done.load()) continue;
      // Sessions in `name` stop; connections still negotiating refuse it
      // from now on (atomically with entering, see Connection::Gate), so
      // sessions in other exports are never closed.
      if (slot->connection->CloseExport(name)) closing.push_back(slot.get());
    }
  }
  // The acceptor may reap (free) a slot once it is done: look slots up
  // under the lock, never through a stale pointer.
  const absl::Time deadline = absl::Now() + wait;
  while (absl::Now() < deadline) {
    size_t running = 0;
    {
      sync::MutexLock lock(&mu_);
      for (auto& slot : slots_) {
        if (!slot->done.load() && std::find(closing.begin(), closing.end(),
                                            slot.get()) != closing.end()) {
          ++running;
        }
      }
    }
    if (running == 0) break;
    absl::SleepFor(absl::Milliseconds(2));
  }
  if (!closing.empty()) {
    LogInfo("nbd_export_sessions_closed",
            {{"export", name},
             {"sessions", static_cast<uint64_t>(closing.size())}});
  }
  return closing.size();
}

NbdServer::~NbdServer() { Shutdown(); }

absl::StatusOr<int> NbdServer::Start(const std::string& tcp_addr,
                                     const std::string& unix_path) {
  {
    sync::MutexLock lock(&mu_);
    if (started_) return absl::FailedPreconditionError("already started");
    started_ = true;
  }
  if (tcp_addr.empty() && unix_path.empty()) {
    return absl::InvalidArgumentError("no NBD listen address");
  }
  absl::StatusOr<nbd::TlsMode> mode = ParseTlsMode(config_.tls().mode());
  if (!mode.ok()) return mode.status();
  if (*mode != nbd::TlsMode::kOff) {
    absl::StatusOr<std::unique_ptr<TlsCredentials>> creds =
        TlsCredentials::Create({config_.tls().cert_file(),
                                config_.tls().key_file(),
                                config_.tls().client_ca_file()});
    if (!creds.ok()) return creds.status();
    tls_ = *std::move(creds);
    options_.tls = tls_.get();
    options_.handshake.tls = *mode;
  }
  int port = 0;
  if (!tcp_addr.empty()) {
    size_t colon = tcp_addr.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("NBD listen address must be host:port: ", tcp_addr));
    }
    std::string host = tcp_addr.substr(0, colon);
    std::string service = tcp_addr.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    struct addrinfo hints = {};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    struct addrinfo* res = nullptr;
    int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(),
                         &hints, &res);
    if (rc != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot resolve NBD listen address ", tcp_addr, ": ",
                       gai_strerror(rc)));
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      freeaddrinfo(res);
      return Errno("socket");
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 128) != 0) {
      absl::Status s = Errno(absl::StrCat("bind/listen ", tcp_addr));
      freeaddrinfo(res);
      close(fd);
      return s;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, reinterpret_cast<struct sockaddr*>(&ss), &sl);
    port = ss.ss_family == AF_INET6
               ? ntohs(reinterpret_cast<struct sockaddr_in6*>(&ss)->sin6_port)
               : ntohs(reinterpret_cast<struct sockaddr_in*>(&ss)->sin_port);
    tcp_fd_ = fd;
  }
  if (!unix_path.empty()) {
    struct sockaddr_un sa = {};
    sa.sun_family = AF_UNIX;
    // Bound under a private name, then published at unix_path without
    // replacing a live server's socket (server/common/unix_socket.h).
    const std::string bound = PrivateBindPath(unix_path);
    if (bound.size() >= sizeof sa.sun_path) {
      return absl::InvalidArgumentError("NBD Unix socket path too long");
    }
    memcpy(sa.sun_path, bound.c_str(), bound.size() + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Errno("socket");
    if (bind(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa) != 0 ||
        listen(fd, 128) != 0) {
      absl::Status s = Errno(absl::StrCat("bind/listen ", unix_path));
      close(fd);
      unlink(bound.c_str());
      return s;
    }
    absl::StatusOr<std::unique_ptr<OwnedUnixSocket>> owned =
        OwnedUnixSocket::Publish(bound, unix_path);
    if (!owned.ok()) {
      close(fd);
      return owned.status();
    }
    unix_fd_ = fd;
    unix_socket_ = *std::move(owned);
  }
  // Non-blocking both ends: connection threads write one byte when they
  // end, and must never block on a full pipe (a full pipe is readable).
  if (pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) return Errno("pipe");
  acceptor_ = std::thread([this] { AcceptLoop(); });
  LogInfo("nbd_listening", {{"port", port}, {"unix", unix_path}});
  return port;
}

void NbdServer::AcceptLoop() {
  for (;;) {
    // At the hard bound (twice the cap: evicted connections still
    // draining) stop accepting until one ends, instead of accepting and
    // closing: new clients wait in the listen backlog, in arrival order,
    // and a good client is not refused because hostile ones reconnect
    // faster than evicted threads end.
    const bool at_bound = active_.load() >= 2 * max_connections_;
    struct pollfd pfds[3];
    nfds_t n = 0;
    pfds[n++] = {wake_[0], POLLIN, 0};
    if (!at_bound) {
      if (tcp_fd_ >= 0) pfds[n++] = {tcp_fd_, POLLIN, 0};
      if (unix_fd_ >= 0) pfds[n++] = {unix_fd_, POLLIN, 0};
    }
    int r = poll(pfds, n, 1000);
    if (r < 0 && errno != EINTR) return;
    if (r > 0 && (pfds[0].revents & POLLIN)) {
      char drain[256];
      while (read(wake_[0], drain, sizeof drain) > 0) {
      }
    }
    {
      sync::MutexLock lock(&mu_);
      if (stopping_) return;
      ReapLocked();
    }
    if (r <= 0) continue;
    for (nfds_t i = 1; i < n; ++i) {
      if (!(pfds[i].revents & POLLIN)) continue;
      int fd = accept4(pfds[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;  // EAGAIN, ECONNABORTED, EMFILE: try later
      if (pfds[i].fd == tcp_fd_) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      }
      OnAccept(fd);
    }
  }
}

void NbdServer::OnAccept(int fd) {
  sync::MutexLock lock(&mu_);
  if (active_.load() >= max_connections_) {
    // Full. A client still in its handshake makes room: the oldest one is
    // stopped (a real client finishes in milliseconds; the stuck ones are
    // idle, flooding or half-open), so hostile clients cannot keep good
    // ones out. Failing that, the established session idle the longest
    // (nothing being received, handled or answered) goes, if it has been
    // idle for at least the grace (nbd.idle_eviction_grace_ms): clients
    // that finish the handshake and then sit idle cannot lock good ones
    // out either. Busy sessions are never evicted. Evicted slots still
    // count until their thread ends, bounded at twice the cap.
    Slot* victim = nullptr;
    for (auto& s : slots_) {
      // A connection that entered its export (Gate() recorded it before the
      // final GO / EXPORT_NAME reply) is a session, not a handshake, even
      // before its phase changes: the client may already hold the reply.
      if (s->evicted ||
          s->connection->phase() != nbd::Connection::Phase::kHandshake ||
          s->connection->entered() != nullptr) {
        continue;
      }
      if (victim == nullptr ||
          s->connection->started() < victim->connection->started()) {
        victim = s.get();
      }
    }
    absl::Time idle_since = absl::InfiniteFuture();
    if (victim == nullptr && idle_eviction_grace_ != absl::InfiniteDuration()) {
      const absl::Time idle_before = absl::Now() - idle_eviction_grace_;
      for (auto& s : slots_) {
        if (s->evicted) continue;
        const absl::Time t = s->connection->IdleSince();
        if (t <= idle_before && t < idle_since) {
          idle_since = t;
          victim = s.get();
        }
      }
    }
    if (victim == nullptr || active_.load() >= 2 * max_connections_) {
      rejected_.fetch_add(1);
      LogWarning(
          "nbd_connection_rejected",
          {{"reason", "max_connections"},
           {"max_connections", static_cast<uint64_t>(max_connections_)}});
      close(fd);
      return;
    }
    victim->evicted = true;
    victim->connection->Stop();
    if (idle_since != absl::InfiniteFuture()) {
      evicted_idle_.fetch_add(1);
      const nbd::ShimExport* e = victim->connection->entered();
      LogWarning("nbd_idle_session_evicted",
                 {{"reason", "max_connections"},
                  {"export", e != nullptr ? e->name : ""},
                  {"idle_ms", static_cast<int64_t>(absl::ToInt64Milliseconds(
                                  absl::Now() - idle_since))}});
    } else {
      evicted_.fetch_add(1);
    }
  }
  active_.fetch_add(1);
  auto slot = std::make_unique<Slot>();
  slot->exports = exports_;
  slot->connection = std::make_unique<nbd::Connection>(
      fd, slot->exports.get(), cache_, &pool_, &budget_, options_);
  Slot* raw = slot.get();
  slots_.push_back(std::move(slot));
  raw->thread = std::thread([this, raw] {
    raw->connection->Serve();
    active_.fetch_sub(1);
    raw->done.store(true);
    // Lets the acceptor reap this thread now and resume accepting if it
    // paused at the bound. wake_ stays open until every connection thread
    // has been joined (Shutdown).
    char c = 0;
    (void)!write(wake_[1], &c, 1);
  });
}

void NbdServer::ReapLocked() {
  mu_.AssertHeld();
  for (auto it = slots_.begin(); it != slots_.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      it = slots_.erase(it);
    } else {
      ++it;
    }
  }
}

void NbdServer::Shutdown() {
  {
    sync::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (wake_[1] >= 0) {
    char c = 0;
    (void)!write(wake_[1], &c, 1);
  }
  if (acceptor_.joinable()) acceptor_.join();
  for (int* fd : {&tcp_fd_, &unix_fd_}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
  unix_socket_.reset();  // removes the path if it is still ours
  std::list<std::unique_ptr<Slot>> slots;
  {
    sync::MutexLock lock(&mu_);
    slots.swap(slots_);
  }
  for (auto& s : slots) s->connection->Stop();
  for (auto& s : slots) {
    if (s->thread.joinable()) s->thread.join();
  }
  // Last: connection threads write to it when they end.
  for (int* fd : {&wake_[0], &wake_[1]}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
}

}  // namespace blockmeta
