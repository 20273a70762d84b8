// server/nbd/connection.cc — one NBD session: handshake, transmission loop,
// reply queue (see connection.h).
#include "server/nbd/connection.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/common/log.h"
#include "server/upstream/nbd_errors.h"

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

// Bytes read from the socket at a time ahead of the request being received
// (headers of pipelined requests arrive together); payloads at least this
// large are read straight into place.
constexpr size_t kInputBufferBytes = 16 << 10;

// "Never" for the published idle / stalled instants.
constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

absl::Time FromNs(int64_t ns) {
  return ns == kNever ? absl::InfiniteFuture() : absl::FromUnixNanos(ns);
}

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
      stream_(fd, /*owns=*/true),
      idle_since_ns_(kNever),
      stalled_since_ns_(kNever) {}

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
  // From here on nothing blocks on the socket: the loop polls it.
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
  inbuf_.reset(new char[kInputBufferBytes]);
  {
    sync::MutexLock lock(&mu_);
    last_activity_ = absl::Now();  // before the phase: IdleSince() reads it
    idle_since_ns_.store(absl::ToUnixNanos(last_activity_));
  }
  phase_.store(Phase::kTransmission);
  const std::string& name = negotiated_->export_entry->name;
  LogDebug("nbd_session_start",
           {{"export", name},
            {"structured", negotiated_->structured_replies},
            {"contexts", static_cast<uint64_t>(negotiated_->contexts.size())}});
  const std::string reason = Loop();
  shutdown(fd_, SHUT_RDWR);  // no more replies; hand-offs drop theirs
  {
    sync::MutexLock lock(&mu_);
    broken_ = true;
    // A hand-off still running, or a writer still holding the front reply,
    // uses the connection until it finishes (bounded by the upstream
    // timeout; a write never blocks).
    while (running_ > 0 || writing_) {
      mu_.WaitWithDeadline(&changed_, absl::InfiniteFuture());
    }
    while (!out_.empty()) {
      ReleaseLocked(out_.front().charged);
      out_.pop_front();
    }
    stalled_since_ns_.store(kNever);
  }
  receiving_.store(false);
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
  return FromNs(idle_since_ns_.load());
}

absl::Time Connection::StalledSince() const {
  if (phase_.load() != Phase::kTransmission) return absl::InfiniteFuture();
  return FromNs(stalled_since_ns_.load());
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
  if (inflight_ == 0) idle_since_ns_.store(absl::ToUnixNanos(last_activity_));
}

void Connection::WriteLocked() {
  // The caller set writing_: the front reply is this thread's to write.
  while (!broken_ && !out_.empty()) {
    Pending& p = out_.front();
    const char* data = p.bytes.data() + p.written;
    const size_t left = p.bytes.size() - p.written;
    mu_.Unlock();  // never held across a write
    absl::StatusOr<size_t> w = io_->TryWrite(data, left);
    mu_.Lock();
    if (!w.ok()) {
      broken_ = true;  // the client is gone; the loop sees EOF/HUP
      shutdown(fd_, SHUT_RDWR);
      break;
    }
    if (*w == 0) break;  // socket full: the loop waits for POLLOUT
    const absl::Time now = absl::Now();
    stalled_since_ns_.store(absl::ToUnixNanos(now));  // the client reads
    p.written += *w;
    if (p.written < p.bytes.size()) continue;
    ReleaseLocked(p.charged);
    out_.pop_front();
    front_since_ = now;
  }
  if (out_.empty()) stalled_since_ns_.store(kNever);
  writing_ = false;
}

void Connection::FinishLocked(bool handled, bool from_loop) {
  if (handled) --running_;
  if (from_loop) return;  // the loop looks at the queue itself
  // The loop must learn about output left for POLLOUT, freed budget (to
  // read again) or a finished hand-off (drain); otherwise it sleeps on.
  if (loop_wants_wake_ || (!out_.empty() && !writing_)) Wake();
  changed_.SignalAll();
}

void Connection::QueueReply(Reply reply, uint64_t charged, bool handled,
                            bool from_loop) {
  // Everything but the write happens under mu_, the wake-up too: once a
  // hand-off's running_ count drops and the lock is released, Serve() may
  // return and the connection be destroyed.
  sync::MutexLock lock(&mu_);
  if (broken_) {
    ReleaseLocked(charged);
  } else {
    if (out_.empty()) {
      front_since_ = absl::Now();
      stalled_since_ns_.store(absl::ToUnixNanos(front_since_));
    }
    out_.push_back(Pending{std::move(reply), 0, charged});
    if (!writing_) {  // else the writer takes this one too
      writing_ = true;
      WriteLocked();
    }
  }
  FinishLocked(handled, from_loop);
}

absl::StatusOr<size_t> Connection::Pull(char* dst, size_t n) {
  if (inbuf_pos_ == inbuf_end_) {
    if (rx_drained_) return size_t{0};
    if (dst != nullptr && n >= kInputBufferBytes) {  // straight into place
      absl::StatusOr<size_t> r = io_->TryRead(dst, n);
      if (r.ok() && *r < n) rx_drained_ = true;
      return r;
    }
    absl::StatusOr<size_t> r = io_->TryRead(inbuf_.get(), kInputBufferBytes);
    if (!r.ok()) return r.status();
    // A short read emptied the socket: poll before reading again.
    if (*r < kInputBufferBytes) rx_drained_ = true;
    inbuf_pos_ = 0;
    inbuf_end_ = *r;
  }
  const size_t k = std::min(n, inbuf_end_ - inbuf_pos_);
  if (dst != nullptr) std::memcpy(dst, inbuf_.get() + inbuf_pos_, k);
  inbuf_pos_ += k;
  return k;
}

Connection::Rx Connection::Receive(std::string* why) {
  const Negotiated& n = *negotiated_;
  rx_drained_ = false;
  rx_blocked_ = false;
  bool admitted = true;  // the loop admitted the first request
  for (;;) {
    if (!in_.started) {
      if (inbuf_pos_ == inbuf_end_ && rx_drained_) return Rx::kAgain;
      if (!admitted) {
        sync::MutexLock lock(&mu_);
        if (!CanAdmitLocked(Charge(Request{}, 0))) {
          loop_wants_wake_ = true;
          rx_blocked_ = inbuf_pos_ < inbuf_end_;
          return Rx::kAgain;
        }
      }
      absl::StatusOr<size_t> k =
          Pull(reinterpret_cast<char*>(in_.header), kRequestHeaderSize);
      if (!k.ok()) {
        *why = kClientLeft;
        return Rx::kStop;
      }
      if (*k == 0) return Rx::kAgain;
      in_.started = true;
      in_.header_got = *k;
      // The whole request must arrive within the write timeout once begun.
      in_.deadline = absl::Now() + options_.write_timeout;
      receiving_.store(true, std::memory_order_relaxed);
    }
    while (in_.header_got < kRequestHeaderSize) {
      absl::StatusOr<size_t> k =
          Pull(reinterpret_cast<char*>(in_.header) + in_.header_got,
               kRequestHeaderSize - in_.header_got);
      if (!k.ok()) {
        *why = kClientLeft;
        return Rx::kStop;
      }
      if (*k == 0) return Rx::kAgain;
      in_.header_got += *k;
    }
    if (!in_.parsed) {
      if (!ParseRequestHeader(in_.header, &in_.request)) {
        LogWarning("nbd_bad_request_magic", {{"export", n.export_entry->name}});
        *why = "bad request magic";
        return Rx::kStop;
      }
      in_.verdict = ValidateRequest(in_.request, n);
      if (in_.verdict.disconnect) {
        if (in_.request.type != kCmdDisc) {
          LogWarning("nbd_request_disconnect",
                     {{"reason", std::string(in_.verdict.reason)}});
          *why = std::string(in_.verdict.reason);
        } else {
          *why = kClientLeft;  // DISC: requests in flight still finish
        }
        return Rx::kStop;
      }
      in_.parsed = true;
      if (in_.verdict.payload > 0 && !in_.verdict.discard_payload) {
        in_.payload.resize(in_.verdict.payload);
      }
    }
    while (in_.payload_got < in_.verdict.payload) {
      char* dst = in_.verdict.discard_payload
                      ? nullptr
                      : in_.payload.data() + in_.payload_got;
      absl::StatusOr<size_t> k =
          Pull(dst, static_cast<size_t>(std::min<uint64_t>(
                        in_.verdict.payload - in_.payload_got, 1u << 30)));
      if (!k.ok()) {
        *why = kClientLeft;
        return Rx::kStop;
      }
      if (*k == 0) return Rx::kAgain;
      in_.payload_got += *k;
    }
    const Request r = in_.request;
    const Verdict v = in_.verdict;
    std::string payload = std::move(in_.payload);
    in_ = Incoming{};
    receiving_.store(false, std::memory_order_relaxed);
    Dispatch(r, v, std::move(payload));
    admitted = false;
  }
}

void Connection::Dispatch(const Request& r, const Verdict& v,
                          std::string payload) {
  const Negotiated& n = *negotiated_;
  const uint64_t charged = Charge(r, v.error != 0 ? 0 : payload.size());
  // A cache hit is answered here, on this thread: no hand-off.
  std::optional<std::string> hit;
  if (v.error == 0 && r.type == kCmdBlockStatus) {
    hit = handler_->AnswerFromCache(r);
  }
  const bool hand_off = v.error == 0 && !hit.has_value();
  {
    sync::MutexLock lock(&mu_);
    ++inflight_;
    inflight_bytes_ += charged;
    budget_->used.fetch_add(charged);
    last_activity_ = absl::Now();
    idle_since_ns_.store(kNever);
    if (hand_off) ++running_;
  }
  if (!hand_off) {
    Reply reply;
    reply.str = hit.has_value() ? *std::move(hit)
                                : ErrorReply(n.structured_replies, r.handle,
                                             v.error, v.reason);
    QueueReply(std::move(reply), charged, /*handled=*/false,
               /*from_loop=*/true);
    return;
  }
  if (RequestHandler::IsAsync(r.type)) {
    // Issued from this thread, completed on an upstream engine thread (or
    // here, if it cannot be issued); running_ keeps the connection alive
    // until the completion queued its reply.
    handler_->Start(r, std::move(payload), [this, charged](Reply reply) {
      QueueReply(std::move(reply), charged, /*handled=*/true,
                 /*from_loop=*/false);
    });
    return;
  }
  const bool scheduled = pool_->Schedule(
      [this, r, payload = std::move(payload), charged]() mutable {
        Reply reply;
        reply.str = handler_->Handle(r, std::move(payload));
        QueueReply(std::move(reply), charged, /*handled=*/true,
                   /*from_loop=*/false);
      });
  if (!scheduled) {  // the server is going away
    Reply reply;
    reply.str = ErrorReply(n.structured_replies, r.handle, kNbdEshutdown,
                           "server shutting down");
    QueueReply(std::move(reply), charged, /*handled=*/true,
               /*from_loop=*/true);
  }
}

std::string Connection::Loop() {
  bool reading = true;  // false after DISC, EOF or bad input: drain
  std::string why;      // why reading stopped
  for (;;) {
    bool want_read = false, want_write;
    absl::Time wake_at = absl::InfiniteFuture();
    const absl::Time now = absl::Now();
    {
      sync::MutexLock lock(&mu_);
      if (broken_) return why.empty() ? "client gone" : why;
      if (!reading && running_ == 0 && out_.empty() && !writing_) return why;
      want_write = !out_.empty() && !writing_;
      if (!out_.empty()) {
        const absl::Time dl = front_since_ + options_.write_timeout;
        if (now >= dl) return "write timeout";
        wake_at = dl;
      }
      if (reading) {
        // A request of unknown size is admitted like a small one; a larger
        // one still fits because one request is always admitted. One
        // begun is read to its end.
        want_read = in_.started || CanAdmitLocked(Charge(Request{}, 0));
        if (options_.idle_timeout != absl::InfiniteDuration() && !in_.started) {
          if (inflight_ == 0) {
            const absl::Time idle_end = last_activity_ + options_.idle_timeout;
            if (now >= idle_end) return "idle timeout";
            wake_at = std::min(wake_at, idle_end);
          } else if (want_read) {
            wake_at = std::min(wake_at, now + options_.idle_timeout);
          }
        }
      }
      // Backpressure or drain: completions must wake the loop.
      loop_wants_wake_ = !want_read;
    }
    if (reading && in_.started) {
      if (now >= in_.deadline) {
        LogInfo("nbd_request_timeout",
                {{"export", negotiated_->export_entry->name}});
        reading = false;
        why = "request timeout";
        continue;
      }
      wake_at = std::min(wake_at, in_.deadline);
    }
    if (want_read && (rx_blocked_ || io_->HasBufferedInput())) {
      if (Receive(&why) == Rx::kStop) reading = false;
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
      if (!writing_ && !out_.empty()) {
        writing_ = true;
        WriteLocked();
      }
    }
    if (want_read && (ev & (POLLIN | POLLERR | POLLHUP))) {
      if (Receive(&why) == Rx::kStop) reading = false;
    } else if (!want_read && (ev & (POLLERR | POLLHUP)) && !want_write) {
      return "client gone";
    }
  }
}

}  // namespace nbd
}  // namespace blockmeta
