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
      stall_eviction_grace_(
          absl::Milliseconds(config.stall_eviction_grace_ms() != 0
                                 ? config.stall_eviction_grace_ms()
                                 : NbdServerDefaults::kStallEvictionGraceMs)),
      admission_wait_(
          absl::Milliseconds(config.admission_wait_ms() != 0
                                 ? config.admission_wait_ms()
                                 : NbdServerDefaults::kAdmissionWaitMs)),
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

std::vector<NbdServer::SlotRef> NbdServer::Snapshot() {
  sync::MutexLock lock(&mu_);
  return std::vector<SlotRef>(slots_.begin(), slots_.end());
}

size_t NbdServer::CloseExport(const std::string& name, absl::Duration wait) {
  // Sessions are called and waited for outside mu_: the snapshot's
  // references keep them alive even if the acceptor reaps them meanwhile.
  // A slot started after the snapshot negotiates against the export list
  // SetExports() installed before this call, without `name`.
  std::vector<SlotRef> closing;
  for (SlotRef& slot : Snapshot()) {
    if (slot->done.load()) continue;
    // Sessions in `name` stop; connections still negotiating refuse it
    // from now on (atomically with entering, see Connection::Gate), so
    // sessions in other exports are never closed.
    if (slot->connection->CloseExport(name)) closing.push_back(slot);
  }
  const absl::Time deadline = absl::Now() + wait;
  while (absl::Now() < deadline &&
         std::any_of(closing.begin(), closing.end(),
                     [](const SlotRef& s) { return !s->done.load(); })) {
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
  const auto ms_until = [](absl::Time t) {
    return static_cast<int>(std::clamp<int64_t>(
        absl::ToInt64Milliseconds(t - absl::Now()) + 1, 0, 1000));
  };
  std::vector<pollfd> pfds;
  for (;;) {
    // At the hard bound (twice the cap: evicted connections still
    // draining), or with a full waiting line, stop accepting until that
    // changes, instead of accepting and closing: new clients wait in the
    // listen backlog, in arrival order, and a good client is not refused
    // because hostile ones reconnect faster than evicted threads end.
    const bool take_new = active_.load() < 2 * max_connections_ &&
                          waiting_.size() < max_connections_;
    pfds.clear();
    pfds.push_back({wake_[0], POLLIN, 0});
    if (take_new) {
      if (tcp_fd_ >= 0) pfds.push_back({tcp_fd_, POLLIN, 0});
      if (unix_fd_ >= 0) pfds.push_back({unix_fd_, POLLIN, 0});
    }
    const size_t first_refusing = pfds.size();
    absl::Time wake_at = absl::Now() + absl::Seconds(1);
    for (const Refusing& r : refusing_) {
      pfds.push_back({r.fd, POLLIN, 0});
      wake_at = std::min(wake_at, r.deadline);
    }
    // Waiting clients: look for room again soon (sessions become
    // evictable as time passes, without any event).
    if (!waiting_.empty()) {
      wake_at = std::min(wake_at, absl::Now() + absl::Milliseconds(20));
    }
    int r = poll(pfds.data(), pfds.size(), ms_until(wake_at));
    if (r < 0 && errno != EINTR) break;
    if (r > 0 && (pfds[0].revents & POLLIN)) {
      char drain[256];
      while (read(wake_[0], drain, sizeof drain) > 0) {
      }
    }
    std::vector<SlotRef> finished;
    {
      sync::MutexLock lock(&mu_);
      if (stopping_) break;
      ReapLocked(&finished);
    }
    // Their Serve() returned: these joins end at once.
    for (SlotRef& s : finished) s->thread.join();
    finished.clear();
    if (r > 0) {
      for (size_t i = 1; i < first_refusing; ++i) {
        if (!(pfds[i].revents & POLLIN)) continue;
        int fd = accept4(pfds[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) continue;  // EAGAIN, ECONNABORTED, EMFILE: try later
        if (pfds[i].fd == tcp_fd_) {
          int one = 1;
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        waiting_.push_back({fd, absl::Now()});
      }
      // refusing_ is unchanged since pfds was built (Admit runs below).
      size_t i = first_refusing;
      for (auto it = refusing_.begin(); it != refusing_.end(); ++i) {
        if ((pfds[i].revents & (POLLIN | POLLERR | POLLHUP)) &&
            !ServeRefusal(*it)) {
          it = refusing_.erase(it);
        } else {
          ++it;
        }
      }
    }
    const absl::Time now = absl::Now();
    for (auto it = refusing_.begin(); it != refusing_.end();) {
      if (now >= it->deadline) {
        close(it->fd);
        it = refusing_.erase(it);
      } else {
        ++it;
      }
    }
    Admit();
  }
  for (const Waiting& w : waiting_) close(w.fd);
  waiting_.clear();
  for (const Refusing& f : refusing_) close(f.fd);
  refusing_.clear();
}

void NbdServer::Admit() {
  while (!waiting_.empty()) {
    const absl::Time now = absl::Now();
    const Waiting w = waiting_.front();
    const size_t active = active_.load();
    if (active >= 2 * max_connections_) return;  // evicted ones draining
    if (active < max_connections_ || EvictOne(now)) {
      waiting_.pop_front();
      StartSession(w.fd);
      continue;
    }
    if (now - w.since < admission_wait_) return;  // look again soon
    waiting_.pop_front();
    Refuse(w.fd);
  }
}

bool NbdServer::EvictOne(absl::Time now) {
  // Decided from lock-free session state, outside mu_: a session that
  // holds its own lock (or blocks) cannot stall accepting.
  enum class Why { kStalled, kHandshake, kIdle };
  const std::vector<SlotRef> slots = Snapshot();
  Slot* victim = nullptr;
  Why why = Why::kStalled;
  absl::Time since = absl::InfiniteFuture();
  // 1. Stalled the longest: the client has not taken a byte of its
  // replies for the grace (it stopped reading).
  const absl::Time stalled_before = now - stall_eviction_grace_;
  for (const SlotRef& s : slots) {
    if (s->evicted.load() || s->done.load()) continue;
    const absl::Time t = s->connection->StalledSince();
    if (t <= stalled_before && t < since) {
      since = t;
      victim = s.get();
    }
  }
  // 2. The oldest handshake. A connection that entered its export (Gate()
  // recorded it before the final GO / EXPORT_NAME reply) is a session, not
  // a handshake, even before its phase changes: the client may already
  // hold the reply. Real clients finish in milliseconds; the stuck ones are
  // idle, flooding or half-open.
  if (victim == nullptr) {
    why = Why::kHandshake;
    for (const SlotRef& s : slots) {
      if (s->evicted.load() || s->done.load() ||
          s->connection->phase() != nbd::Connection::Phase::kHandshake ||
          s->connection->entered() != nullptr) {
        continue;
      }
      if (victim == nullptr ||
          s->connection->started() < victim->connection->started()) {
        victim = s.get();
        since = s->connection->started();
      }
    }
  }
  // 3. Idle the longest, past the grace.
  if (victim == nullptr && idle_eviction_grace_ != absl::InfiniteDuration()) {
    why = Why::kIdle;
    const absl::Time idle_before = now - idle_eviction_grace_;
    for (const SlotRef& s : slots) {
      if (s->evicted.load() || s->done.load()) continue;
      const absl::Time t = s->connection->IdleSince();
      if (t <= idle_before && t < since) {
        since = t;
        victim = s.get();
      }
    }
  }
  if (victim == nullptr) return false;
  victim->evicted.store(true);
  victim->connection->Stop();
  const nbd::ShimExport* e = victim->connection->entered();
  const int64_t for_ms = absl::ToInt64Milliseconds(now - since);
  switch (why) {
    case Why::kStalled:
      evicted_stalled_.fetch_add(1);
      LogWarning("nbd_stalled_session_evicted",
                 {{"reason", "max_connections"},
                  {"export", e != nullptr ? e->name : ""},
                  {"stalled_ms", for_ms}});
      break;
    case Why::kHandshake:
      evicted_.fetch_add(1);
      break;
    case Why::kIdle:
      evicted_idle_.fetch_add(1);
      LogWarning("nbd_idle_session_evicted",
                 {{"reason", "max_connections"},
                  {"export", e != nullptr ? e->name : ""},
                  {"idle_ms", for_ms}});
      break;
  }
  return true;
}

void NbdServer::StartSession(int fd) {
  active_.fetch_add(1);
  auto slot = std::make_shared<Slot>();
  Slot* raw = slot.get();
  {
    // One step with reading the export list: CloseExport() either sees
    // this slot or it negotiates against a list without the closed export.
    sync::MutexLock lock(&mu_);
    slot->exports = exports_;
    slot->connection = std::make_unique<nbd::Connection>(
        fd, slot->exports.get(), cache_, &pool_, &budget_, options_);
    slots_.push_back(std::move(slot));
  }
  // Only this thread (and Shutdown, after joining it) touches `thread`.
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

void NbdServer::Refuse(int fd) {
  rejected_.fetch_add(1);
  LogWarning("nbd_connection_rejected",
             {{"reason", "max_connections"},
              {"max_connections", static_cast<uint64_t>(max_connections_)}});
  if (refusing_.size() >= NbdServerDefaults::kMaxRefusing) {
    close(fd);  // a flood of refusals: no more answers
    return;
  }
  Refusing r;
  r.fd = fd;
  r.deadline = absl::Now() + absl::Milliseconds(NbdServerDefaults::kRefusalMs);
  r.refusal = std::make_unique<nbd::Refusal>(
      absl::StrCat("blockmeta: the NBD server is at max_connections (",
                   max_connections_, "); try again later"));
  const std::string greeting = r.refusal->Greeting();
  if (send(fd, greeting.data(), greeting.size(), MSG_DONTWAIT | MSG_NOSIGNAL) !=
      static_cast<ssize_t>(greeting.size())) {
    close(fd);
    return;
  }
  refusing_.push_back(std::move(r));
}

bool NbdServer::ServeRefusal(Refusing& r) {
  char buf[4096];
  const ssize_t n = recv(r.fd, buf, sizeof buf, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
    return true;
  }
  if (n <= 0) {  // EOF or error: done
    close(r.fd);
    return false;
  }
  if (r.closing) return true;  // drain what the client still sends
  std::string out;
  const bool more = r.refusal->Feed(std::string_view(buf, n), &out);
  if (!out.empty() &&
      send(r.fd, out.data(), out.size(), MSG_DONTWAIT | MSG_NOSIGNAL) !=
          static_cast<ssize_t>(out.size())) {
    close(r.fd);  // a client that does not read its few replies
    return false;
  }
  if (!more) {
    // Our side is done. Closing with unread input would make TCP reset
    // the connection, and the client might lose the reply: shut our side,
    // read until the client closes (or the deadline).
    shutdown(r.fd, SHUT_WR);
    r.closing = true;
  }
  return true;
}

void NbdServer::ReapLocked(std::vector<SlotRef>* out) {
  mu_.AssertHeld();
  for (auto it = slots_.begin(); it != slots_.end();) {
    if ((*it)->done.load()) {
      out->push_back(std::move(*it));
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
  std::list<SlotRef> slots;
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
