// server/upstream/nbd_conn.cc — see nbd_conn.h.
#include "server/upstream/nbd_conn.h"

#include <errno.h>

#include <algorithm>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/upstream/nbd_errors.h"

namespace blockmeta {
namespace upstream_internal {
namespace {

// An idle handle gets a small read after this long without traffic: a
// server that shuts down does not always close idle connections (nbdkit
// 1.32 may keep them open and answer ESHUTDOWN), so silence proves nothing.
constexpr absl::Duration kProbeIdle = absl::Milliseconds(700);
// How long a soft disconnect may take before the handle is just closed.
constexpr absl::Duration kDrainLimit = absl::Seconds(1);

// The Op whose nbd_aio_* call is running on this thread.
thread_local Op* tls_issuing = nullptr;

}  // namespace

Conn::Conn(std::shared_ptr<ConnOwner> owner, nbd_handle* h,
           absl::Time handshake_deadline)
    : owner_(std::move(owner)),
      h_(h),
      handshake_deadline_(handshake_deadline),
      handshake_(h) {}

Conn::~Conn() {
  {
    sync::MutexLock lock(&mu_);
    closing_ = true;
    if (close_.status.ok()) {
      close_.status = absl::UnavailableError(absl::StrCat(
          "export ", owner_->name(), ": upstream connection closed"));
    }
  }
  nbd_close(h_);  // frees (retires) every command still in flight
  RunFinished();
}

void Conn::Abandon(const absl::Status& why) {
  sync::MutexLock lock(&mu_);
  if (abandoned_) return;
  close_ = CloseReason(why);
  closing_ = true;
  abandoned_ = true;
}

int Conn::OnComplete(void* user_data, int* error) {
  auto* op = static_cast<Op*>(user_data);
  op->completed = true;
  op->error = *error;
  return 1;  // retire automatically
}

void Conn::OnFree(void* user_data) {
  auto* op = static_cast<Op*>(user_data);
  op->conn->Retire(op);
  FinishedOps().push_back(op);
}

void Conn::Retire(Op* op) {
  Counters& n = owner_->counters();
  if (!op->probe) n.in_flight.fetch_sub(1);
  in_flight_.fetch_sub(1);
  last_activity_.store(absl::ToUnixNanos(absl::Now()));
  const std::string& name = owner_->name();
  sync::MutexLock lock(&mu_);
  inflight_.erase(op->pos);
  if (abandoned_) {
    // Whatever the server said, it said too late: the caller was failed.
    if (!op->probe) n.failed.fetch_add(1);
    op->outcome = close_.status;
    return;
  }
  if (op->completed && op->error == 0) {
    op->outcome = absl::OkStatus();
    return;
  }
  if (!op->probe) n.failed.fetch_add(1);
  if (op->completed && op->error == ESHUTDOWN) {
    // NBD: the server is shutting down; the client must disconnect softly.
    saw_shutdown_.store(true);
    op->outcome = absl::UnavailableError(
        absl::StrCat("export ", name, ": upstream ", op->what,
                     ": server is shutting down (ESHUTDOWN)"));
    op->outcome = WithNbdError(std::move(op->outcome), kNbdEshutdown);
  } else if (op->completed && !closing_ && op->error != ENOTCONN) {
    // The server refused this command; the connection is fine.
    op->outcome = StatusFromErrno(
        op->error, absl::StrCat("export ", name, ": upstream ", op->what), "");
  } else if (tls_issuing == op && !op->completed) {
    op->outcome = absl::UnavailableError("");  // set by Issue (per-thread)
  } else if (closing_ && op->issued <= close_.timed_out_before) {
    n.timed_out.fetch_add(1);
    op->outcome = absl::DeadlineExceededError(absl::StrCat(
        "export ", name, ": upstream ", op->what, " did not answer within ",
        absl::FormatDuration(close_.timeout),
        " (upstream_timeout_ms; connection closed)"));
  } else if (closing_) {
    op->outcome = close_.status;
  } else {
    op->outcome = absl::UnavailableError(absl::StrCat(
        "export ", name, ": upstream connection lost during ", op->what));
  }
}

void Conn::Issue(
    Op* op,
    absl::FunctionRef<int64_t(nbd_handle*, nbd_completion_callback)> call) {
  op->conn = this;
  op->issued = absl::Now();
  Counters& n = owner_->counters();
  if (op->probe) {
    n.probes.fetch_add(1);
  } else {
    n.issued.fetch_add(1);
    n.in_flight.fetch_add(1);
    issued_.fetch_add(1);
  }
  last_activity_.store(absl::ToUnixNanos(op->issued));
  const uint64_t now_in = in_flight_.fetch_add(1) + 1;
  uint64_t seen = max_in_flight_.load();
  while (now_in > seen && !max_in_flight_.compare_exchange_weak(seen, now_in)) {
  }
  {
    sync::MutexLock lock(&mu_);
    inflight_.push_back(op);
    op->pos = std::prev(inflight_.end());
  }
  tls_issuing = op;
  const int64_t cookie =
      call(h_, nbd_completion_callback{OnComplete, op, OnFree});
  tls_issuing = nullptr;
  if (cookie == -1) {
    // libnbd already freed (queued) the op on this thread; its error is
    // this thread's.
    absl::Status s = StatusFromNbdError(op->what);
    op->outcome = absl::UnavailableError(
        absl::StrCat("export ", owner_->name(), ": upstream ", s.message()));
  } else {
    owner_->engine().Rearm(this);
  }
  RunFinished();
}

absl::Status Conn::LostStatus(absl::string_view notify_error) const {
  std::string why =
      absl::StrCat("export ", owner_->name(), ": upstream connection lost");
  if (!notify_error.empty()) absl::StrAppend(&why, ": ", notify_error);
  const std::string exit = owner_->ServerExit();
  if (!exit.empty()) {
    why = absl::StrCat("export ", owner_->name(), ": upstream server ", exit);
  }
  return absl::UnavailableError(why);
}

void Conn::OnEvents(absl::string_view notify_error) {
  Advance(notify_error);
  RunFinished();  // what the notify just answered, outside libnbd's lock
}

void Conn::OnTick(absl::Time now) {
  TickPhase(now);
  RunFinished();
}

void Conn::TickPhase(absl::Time now) {
  switch (phase_) {
    case Phase::kHandshaking:
      owner_->engine().Refresh(this);
      if (now > handshake_deadline_) {
        phase_ = Phase::kClosing;
        absl::Status why = absl::DeadlineExceededError(absl::StrCat(
            "export ", owner_->name(), ": connect: handshake timed out"));
        owner_->OnHandshakeFailed(this, why);
        Close(CloseReason(why), false);
        return;
      }
      break;
    case Phase::kReady: {
      absl::Time oldest = absl::InfiniteFuture();
      {
        sync::MutexLock lock(&mu_);
        if (!inflight_.empty()) oldest = inflight_.front()->issued;
      }
      if (oldest == absl::InfiniteFuture() &&
          now - absl::FromUnixNanos(last_activity_.load()) > kProbeIdle &&
          handshake_.info().size > 0) {
        Probe();
        return;
      }
      if (now - oldest > owner_->timeout()) {
        // The upstream exceeded its own timeout: libnbd cannot cancel one
        // command, so the connection goes (and is reconnected).
        CloseReason why;
        why.status = absl::UnavailableError(
            absl::StrCat("export ", owner_->name(),
                         ": upstream connection closed: a command exceeded "
                         "upstream_timeout_ms"));
        why.timed_out_before = now - owner_->timeout();
        why.timeout = owner_->timeout();
        phase_ = Phase::kClosing;
        Close(why, true);
        return;
      }
      break;
    }
    case Phase::kDraining:
      if (now > drain_deadline_) {
        phase_ = Phase::kClosing;
        Close(CloseReason(absl::UnavailableError(
                  absl::StrCat("export ", owner_->name(),
                               ": upstream is shutting down (ESHUTDOWN)"))),
              false);
        return;
      }
      break;
    case Phase::kClosing:
      return;
  }
  Advance("");
}

void Conn::Advance(absl::string_view notify_error) {
  switch (phase_) {
    case Phase::kHandshaking: {
      owner_->engine().Refresh(this);
      absl::StatusOr<bool> r = handshake_.Advance(notify_error);
      if (!r.ok()) {
        phase_ = Phase::kClosing;
        absl::Status why(r.status().code(),
                         absl::StrCat("export ", owner_->name(),
                                      ": connect: ", r.status().message()));
        owner_->OnHandshakeFailed(this, why);
        Close(CloseReason(why), false);
        return;
      }
      if (!*r) return;
      phase_ = Phase::kReady;
      last_activity_.store(absl::ToUnixNanos(absl::Now()));
      if (!owner_->OnHandshakeDone(this, handshake_.info())) {
        phase_ = Phase::kClosing;
        Close(CloseReason(absl::UnavailableError("connection not needed")),
              false);
      }
      return;
    }
    case Phase::kReady:
      if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
        phase_ = Phase::kClosing;
        Close(CloseReason(LostStatus(notify_error)), true);
        return;
      }
      if (saw_shutdown_.load()) StartDrain();
      return;
    case Phase::kDraining:
      if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
        phase_ = Phase::kClosing;
        Close(CloseReason(absl::UnavailableError(
                  absl::StrCat("export ", owner_->name(),
                               ": upstream is shutting down (ESHUTDOWN)"))),
              false);
      }
      return;
    case Phase::kClosing:
      return;
  }
}

void Conn::Probe() {
  auto* op = new ProbeOp;
  op->what = "health probe";
  op->probe = true;
  const uint64_t n = std::min<uint64_t>(
      std::max<uint32_t>(handshake_.info().minimum_block_size, 1),
      handshake_.info().size);
  op->buf.resize(n);
  char* buf = op->buf.data();
  Issue(op, [&](nbd_handle* h, nbd_completion_callback cb) {
    return nbd_aio_pread(h, buf, n, 0, cb, 0);
  });
}

void Conn::StartDrain() {
  // NBD (doc/proto.md, "Terminating the transmission phase"): a client that
  // gets ESHUTDOWN must initiate a soft disconnect (NBD_CMD_DISC); the server
  // answers what is in flight, then closes. A proxy that kept the handle
  // open would hold the server up forever.
  owner_->OnDraining(this);
  phase_ = Phase::kDraining;
  drain_deadline_ = absl::Now() + kDrainLimit;
  if (nbd_aio_disconnect(h_, 0) == -1) {
    phase_ = Phase::kClosing;
    Close(CloseReason(absl::UnavailableError(
              absl::StrCat("export ", owner_->name(),
                           ": upstream is shutting down (ESHUTDOWN)"))),
          false);
  }
}

void Conn::Close(const CloseReason& why, bool lost) {
  {
    sync::MutexLock lock(&mu_);
    close_ = why;
    closing_ = true;
  }
  std::shared_ptr<Conn> ref = owner_->Forget(this, lost, why.status);
  owner_->engine().Unwatch(this);
  // `ref` drops here; the engine's caller still holds one until this
  // callback returns, then ~Conn closes the handle.
}

}  // namespace upstream_internal
}  // namespace blockmeta
