// server/nbd/connection.cc — one NBD session: handshake, transmission loop,
// reply queue (see connection.h).
#include "server/nbd/connection.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/log.h"

namespace blockmeta {
namespace nbd {
namespace {

constexpr char kClientLeft[] = "client left";
// SO_SNDBUF of a Unix-socket client (the kernel doubles it): the default
// (~208 KiB) is smaller than one 256 KiB read reply, so most replies took
// two sends and a hand-off to the loop for POLLOUT; this takes a few whole.
// It is kernel memory outside the byte budgets. TCP keeps its autotuning
// (setting SO_SNDBUF would switch that off).
constexpr int kUnixSendBufferBytes = 1 << 20;

// Bytes a request may pin until its reply is written.
uint64_t Charge(const Request& r, size_t payload) {
  return payload + (r.type == kCmdRead ? r.length : 0) + 64;
}

}  // namespace

Connection::Connection(int fd, const std::vector<ShimExport>* exports,
                       ExtentCache* cache, WorkerPool* pool, ByteBudget* budget,
                       ConnectionOptions options)
    : fd_(fd),
      exports_(exports),
      cache_(cache),
      pool_(pool),
      budget_(budget),
      options_(options),
      started_(absl::Now()),
      wake_fd_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      stream_(fd, /*owns=*/true) {}

Connection::~Connection() {
  if (wake_fd_ >= 0) close(wake_fd_);
}  // stream_ closes the socket

void Connection::Stop() { shutdown(fd_, SHUT_RDWR); }

void Connection::Wake() {
  uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof one);
}

absl::StatusOr<UpstreamInfo> Connection::Gate(const ShimExport& e, bool enter) {
  sync::MutexLock lock(&entry_mu_);
  if (std::find(closed_exports_.begin(), closed_exports_.end(), e.name) !=
      closed_exports_.end()) {
    return absl::NotFoundError("export is being removed");
  }
  // Under the lock: CloseExport() cannot run between this read of the
  // upstream and the recording of the export as entered.
  std::shared_ptr<Upstream> up = e.upstream.lock();
  if (up == nullptr) return absl::NotFoundError("export was removed");
  absl::StatusOr<UpstreamInfo> info = up->Info();
  if (info.ok() && enter) {
    entered_.store(&e);
    upstream_ = std::move(up);  // the session's reference, until it ends
  }
  return info;
}

bool Connection::CloseExport(const std::string& name) {
  sync::MutexLock lock(&entry_mu_);
  if (const ShimExport* in = entered_.load(); in != nullptr) {
    if (in->name != name) return false;
    Stop();
    return true;
  }
  if (phase_.load() == Phase::kDone) return false;
  if (std::find(closed_exports_.begin(), closed_exports_.end(), name) !=
      closed_exports_.end()) {
    return false;
  }
  if (closed_exports_.size() >= 1024) {
    Stop();  // bounded: 1024 exports went while this client negotiated
    return true;
  }
  closed_exports_.push_back(name);
  return false;
}

void Connection::Serve() {
  const absl::Time hs_deadline = started_ + options_.handshake_timeout;
  stream_.SetReadDeadline(hs_deadline);
  stream_.SetWriteDeadline(hs_deadline);
  StartTlsFn start_tls;
  if (options_.tls != nullptr) {
    start_tls = [this]() -> absl::StatusOr<ByteStream*> {
      absl::StatusOr<std::unique_ptr<TlsStream>> t = TlsStream::Accept(
          &stream_, options_.tls->Get(), options_.tls_verify_client,
          options_.tls_require_client_cert);
      if (!t.ok()) {
        LogInfo("nbd_tls_refused", {{"reason", t.status().ToString()}});
        return t.status();
      }
      tls_ = *std::move(t);
      io_ = tls_.get();
      return io_;
    };
  }
  const ExportGateFn gate = [this](const ShimExport& e, bool enter) {
    return Gate(e, enter);
  };
  absl::StatusOr<Negotiated> n =
      RunHandshake(stream_, *exports_, options_.handshake, start_tls, gate);
  if (!n.ok()) {
    LogDebug("nbd_handshake_end", {{"reason", n.status().ToString()}});
    shutdown(fd_, SHUT_RDWR);  // the client sees EOF now, not at reaping
    phase_.store(Phase::kDone);
    return;
  }
  stream_.SetReadDeadline(absl::InfiniteFuture());
  stream_.SetWriteDeadline(absl::InfiniteFuture());
  {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    if (getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
        addr.ss_family == AF_UNIX) {
      int sndbuf = kUnixSendBufferBytes;
      (void)setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    }
  }
  negotiated_.emplace(*std::move(n));  // entered_ was set by Gate()
  handler_.emplace(*negotiated_, cache_);
  {
    sync::MutexLock lock(&mu_);
    last_activity_ = absl::Now();  // before the phase: IdleSince() reads it
  }
  phase_.store(Phase::kTransmission);
  const std::string& name = negotiated_->export_entry->name;
  LogDebug("nbd_session_start",
           {{"export", name},
            {"structured", negotiated_->structured_replies},
            {"contexts", static_cast<uint64_t>(negotiated_->contexts.size())}});
  const std::string reason = Loop();
  if (reason == kClientLeft) {
    // DISC (or EOF): requests in flight still finish and their replies are
    // sent, each write bounded by the write timeout.
    sync::MutexLock lock(&mu_);
    while (running_ > 0)
      mu_.WaitWithDeadline(&changed_, absl::InfiniteFuture());
    stream_.SetWriteDeadline(absl::Now() + options_.write_timeout);
    while (!out_.empty() && !broken_) {
      Pending& p = out_.front();
      if (!io_->WriteAll(p.bytes.data() + p.written, p.bytes.size() - p.written)
               .ok()) {
        break;
      }
      ReleaseLocked(p.charged);
      out_.pop_front();
    }
  }
  shutdown(fd_, SHUT_RDWR);  // no more replies; tasks drop theirs
  {
    sync::MutexLock lock(&mu_);
    broken_ = true;
    while (!out_.empty()) {
      ReleaseLocked(out_.front().charged);
      out_.pop_front();
    }
    while (running_ > 0)
      mu_.WaitWithDeadline(&changed_, absl::InfiniteFuture());
  }
  {
    // Nothing of the session uses the upstream any more: let it go now,
    // not when the connection is reaped (a removed export drains sooner).
    sync::MutexLock lock(&entry_mu_);
    upstream_.reset();
  }
  phase_.store(Phase::kDone);
  LogDebug("nbd_session_end", {{"export", name}, {"reason", reason}});
}

absl::Time Connection::IdleSince() const {
  if (phase_.load() != Phase::kTransmission || receiving_.load()) {
    return absl::InfiniteFuture();
  }
  sync::MutexLock lock(&mu_);
  if (inflight_ != 0 || running_ != 0 || !out_.empty()) {
    return absl::InfiniteFuture();
  }
  return last_activity_;
}

bool Connection::CanAdmitLocked(uint64_t bytes) const {
  if (inflight_ == 0) return true;  // one request always goes through
  return inflight_ < options_.max_inflight_requests &&
         inflight_bytes_ + bytes <= options_.max_inflight_bytes &&
         budget_->used.load() + bytes <= budget_->limit;
}

void Connection::ReleaseLocked(uint64_t charged) {
  --inflight_;
  inflight_bytes_ -= charged;
  budget_->used.fetch_sub(charged);
  last_activity_ = absl::Now();
}

void Connection::FlushLocked() {
  while (!out_.empty() && !broken_) {
    Pending& p = out_.front();
    absl::StatusOr<size_t> w =
        io_->TryWrite(p.bytes.data() + p.written, p.bytes.size() - p.written);
    if (!w.ok()) {
      broken_ = true;  // the client is gone; the loop sees EOF/HUP
      shutdown(fd_, SHUT_RDWR);
      return;
    }
    if (*w == 0) return;  // socket full: the loop waits for POLLOUT
    p.written += *w;
    if (p.written < p.bytes.size()) continue;
    ReleaseLocked(p.charged);
    out_.pop_front();
    front_since_ = absl::Now();
  }
}

void Connection::QueueReply(Reply reply, uint64_t charged, bool handled) {
  // Everything happens under mu_, the wake-up too: once a handed-off
  // request's running_ count drops and the lock is released, Serve() may
  // return and the connection be destroyed.
  sync::MutexLock lock(&mu_);
  if (broken_) {
    ReleaseLocked(charged);
  } else {
    if (out_.empty()) front_since_ = absl::Now();
    out_.push_back(Pending{std::move(reply), 0, charged});
    FlushLocked();
  }
  // The loop must learn about pending output (to poll POLLOUT) or freed
  // budget (to read again); otherwise it sleeps in poll(POLLIN) as is.
  if (loop_wants_wake_ || !out_.empty()) Wake();
  if (handled) {
    --running_;
    changed_.SignalAll();
  }
}

bool Connection::ReadRequest() {
  receiving_.store(true, std::memory_order_relaxed);
  const bool more = ReadRequestBytes();
  receiving_.store(false, std::memory_order_relaxed);
  return more;
}

bool Connection::ReadRequestBytes() {
  const Negotiated& n = *negotiated_;
  // The whole request must arrive within the write timeout once started.
  stream_.SetReadDeadline(absl::Now() + options_.write_timeout);
  uint8_t hdr[kRequestHeaderSize];
  if (!io_->ReadFull(hdr, sizeof hdr).ok()) return false;  // client left
  Request r;
  if (!ParseRequestHeader(hdr, &r)) {
    LogWarning("nbd_bad_request_magic", {{"export", n.export_entry->name}});
    return false;
  }
  Verdict v = ValidateRequest(r, n);
  if (v.disconnect) {
    if (r.type != kCmdDisc) {
      LogWarning("nbd_request_disconnect", {{"reason", std::string(v.reason)}});
    }
    return false;  // DISC: in-flight requests still finish before we close
  }
  std::string payload;
  if (v.payload > 0) {
    if (v.discard_payload) {
      if (!io_->Discard(v.payload).ok()) return false;
    } else {
      payload.resize(v.payload);
      if (!io_->ReadFull(payload.data(), payload.size()).ok()) return false;
    }
  }
  stream_.SetReadDeadline(absl::InfiniteFuture());
  const uint64_t charged = Charge(r, v.error != 0 ? 0 : payload.size());
  {
    sync::MutexLock lock(&mu_);
    ++inflight_;
    inflight_bytes_ += charged;
    budget_->used.fetch_add(charged);
    last_activity_ = absl::Now();
    if (v.error == 0) ++running_;
  }
  if (v.error != 0) {
    Reply reply;
    reply.str = ErrorReply(n.structured_replies, r.handle, v.error, v.reason);
    QueueReply(std::move(reply), charged, /*handled=*/false);
    return true;
  }
  if (RequestHandler::IsAsync(r.type)) {
    // Issued from this thread, completed on an upstream engine thread (or
    // here, if it cannot be issued); running_ keeps the connection alive
    // until the completion queued its reply.
    handler_->Start(r, std::move(payload), [this, charged](Reply reply) {
      QueueReply(std::move(reply), charged, /*handled=*/true);
    });
    return true;
  }
  pool_->Schedule([this, r, payload = std::move(payload), charged]() mutable {
    Reply reply;
    reply.str = handler_->Handle(r, std::move(payload));
    QueueReply(std::move(reply), charged, /*handled=*/true);
  });
  return true;
}

std::string Connection::Loop() {
  for (;;) {
    bool want_read, want_write;
    absl::Time wake_at = absl::InfiniteFuture();
    {
      sync::MutexLock lock(&mu_);
      if (broken_) return "client gone";
      const absl::Time now = absl::Now();
      want_write = !out_.empty();
      if (want_write) {
        const absl::Time dl = front_since_ + options_.write_timeout;
        if (now >= dl) return "write timeout";
        wake_at = dl;
      }
      // A request of unknown size is admitted like a small one; a larger
      // one still fits because one request is always admitted.
      want_read = CanAdmitLocked(Charge(Request{}, 0));
      loop_wants_wake_ = !want_read;
      if (inflight_ == 0 && options_.idle_timeout != absl::InfiniteDuration()) {
        const absl::Time idle_end = last_activity_ + options_.idle_timeout;
        if (now >= idle_end) return "idle timeout";
        wake_at = std::min(wake_at, idle_end);
      } else if (want_read &&
                 options_.idle_timeout != absl::InfiniteDuration()) {
        wake_at = std::min(wake_at, now + options_.idle_timeout);
      }
    }
    if (want_read && io_->HasBufferedInput()) {
      if (!ReadRequest()) return kClientLeft;
      continue;
    }
    struct pollfd pfds[2] = {
        {fd_,
         static_cast<decltype(pollfd::events)>((want_read ? POLLIN : 0) |
                                               (want_write ? POLLOUT : 0)),
         0},
        {wake_fd_, POLLIN, 0}};
    int timeout_ms = -1;
    if (wake_at != absl::InfiniteFuture()) {
      timeout_ms = static_cast<int>(std::clamp<int64_t>(
          absl::ToInt64Milliseconds(wake_at - absl::Now()) + 1, 0, 1 << 30));
    }
    int r = poll(pfds, 2, timeout_ms);
    if (r < 0 && errno != EINTR) return "poll failed";
    if (r <= 0) continue;  // timeouts are checked at the top
    if (pfds[1].revents & POLLIN) {
      uint64_t v;
      (void)!read(wake_fd_, &v, sizeof v);
    }
    const auto ev = pfds[0].revents;
    if (want_write && (ev & (POLLOUT | POLLERR | POLLHUP))) {
      sync::MutexLock lock(&mu_);
      FlushLocked();
    }
    if (want_read && (ev & (POLLIN | POLLERR | POLLHUP))) {
      if (!ReadRequest()) return kClientLeft;
    } else if (!want_read && (ev & (POLLERR | POLLHUP)) && !want_write) {
      return "client gone";
    }
  }
}

}  // namespace nbd
}  // namespace blockmeta
