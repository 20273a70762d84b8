// server/upstream/nbd_conn.h — one libnbd handle of an upstream's pool
// (internal to server/upstream): its handshake, the commands in flight on
// it, and its health, driven by the NbdEngine.
//
// Phases: handshaking (bounded by the handshake deadline) → ready (commands;
// a command older than the owner's timeout closes the handle; an idle
// handle gets a health probe every 700 ms; an ESHUTDOWN reply starts a soft
// disconnect) → draining (NBD_CMD_DISC sent, closed after 1 s at most) →
// closing. Every command in flight is retired exactly once (Retire) with an
// outcome that says why: the server's error, a lost or timed-out
// connection, or the CloseReason.
//
// Ownership: a Conn holds its owner (the pool, a ConnOwner) by shared_ptr,
// so callbacks still running on a driver thread after the facade went find
// it alive; the owner holds its Conns by shared_ptr and forgets one when it
// closes; the handle is closed (nbd_close, retiring what is in flight) in
// ~Conn, when the last reference goes.
//
// Thread-safety: Issue, in_flight and Stats may be called from any thread;
// the NbdDriven callbacks run one at a time on a driver thread. mu_ is taken
// inside libnbd callbacks: never call nbd_* while holding it.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_CONN_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_CONN_H_

#include <libnbd.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/common/mutex.h"
#include "server/upstream/nbd_engine.h"
#include "server/upstream/nbd_handshake.h"
#include "server/upstream/nbd_op.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace upstream_internal {

// The reason a connection was closed, for its unanswered commands.
struct CloseReason {
  CloseReason() = default;
  explicit CloseReason(absl::Status s) : status(std::move(s)) {}
  absl::Status status;
  // Commands issued at or before this time exceeded upstream_timeout_ms.
  absl::Time timed_out_before = absl::InfinitePast();
  absl::Duration timeout;
};

// Counters shared by a Core and its Conns.
struct Counters {
  std::atomic<uint64_t> issued{0};
  std::atomic<uint64_t> in_flight{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> timed_out{0};
  std::atomic<uint64_t> caller_deadlines{0};
  std::atomic<uint64_t> probes{0};
};

class Conn;

// What a Conn needs from the pool that owns it (implemented by Core).
class ConnOwner {
 public:
  virtual ~ConnOwner() = default;
  // Constant: the export's name (for messages), its upstream timeout, the
  // engine driving the handles, the counters shared by the pool.
  virtual const std::string& name() const = 0;
  virtual absl::Duration timeout() const = 0;
  virtual NbdEngine& engine() = 0;
  virtual Counters& counters() = 0;
  // The spawned server's exit, when it is not running ("" else).
  virtual std::string ServerExit() = 0;
  // From driver threads. True: keep the connection; false: close it.
  virtual bool OnHandshakeDone(Conn* c, UpstreamInfo info) = 0;
  virtual void OnHandshakeFailed(Conn* c, const absl::Status& why) = 0;
  virtual void OnDraining(Conn* c) = 0;
  // Forgets `c`; returns the owner's reference (to be dropped unlocked).
  virtual std::shared_ptr<Conn> Forget(Conn* c, bool lost,
                                       const absl::Status& why) = 0;
};

class Conn : public NbdDriven {
 public:
  Conn(std::shared_ptr<ConnOwner> owner, nbd_handle* h,
       absl::Time handshake_deadline);
  ~Conn() override;

  nbd_handle* handle() const override { return h_; }
  void OnEvents(absl::string_view notify_error) override;
  void OnTick(absl::Time now) override;

  // Sends one command: `call` makes the nbd_aio_* call with the given
  // completion and returns its cookie (-1 on failure).
  void Issue(
      Op* op,
      absl::FunctionRef<int64_t(nbd_handle*, nbd_completion_callback)> call);

  // The pool gave the handle up (Core::Close): commands still in flight
  // complete with `why` when the handle is closed, whatever the server
  // answers meanwhile. Call before dropping the pool's reference.
  void Abandon(const absl::Status& why) ABSL_LOCKS_EXCLUDED(mu_);

  uint64_t in_flight() const { return in_flight_.load(); }
  UpstreamStats::Connection Stats() const {
    return {issued_.load(), in_flight_.load(), max_in_flight_.load()};
  }

 private:
  enum class Phase { kHandshaking, kReady, kDraining, kClosing };
  static int OnComplete(void* user_data, int* error);
  static void OnFree(void* user_data);
  void Retire(Op* op);
  void Advance(absl::string_view notify_error);
  void TickPhase(absl::Time now);
  void Probe();
  void StartDrain();
  // Closes for good: the owner forgets it, the engine stops driving it; the
  // handle is closed when the last reference goes (~Conn).
  void Close(const CloseReason& why, bool lost);
  absl::Status LostStatus(absl::string_view notify_error) const;

  // Shared: a Conn being closed on a driver thread may outlive the
  // NbdUpstream facade by a callback's length.
  const std::shared_ptr<ConnOwner> owner_;
  nbd_handle* const h_;
  const absl::Time handshake_deadline_;
  std::atomic<bool> saw_shutdown_{false};  // a reply said ESHUTDOWN
  std::atomic<uint64_t> issued_{0};
  std::atomic<uint64_t> in_flight_{0};
  std::atomic<uint64_t> max_in_flight_{0};
  std::atomic<int64_t> last_activity_{0};  // unix ns of the last issue/reply

  // Driver callbacks only (the engine runs them one at a time).
  Handshake handshake_;
  Phase phase_ = Phase::kHandshaking;
  absl::Time drain_deadline_;

  sync::Mutex mu_;  // taken inside libnbd callbacks: never call nbd_* under it
  std::list<Op*> inflight_ ABSL_GUARDED_BY(mu_);  // in issue order
  CloseReason close_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool abandoned_ ABSL_GUARDED_BY(mu_) = false;  // see Abandon
};

}  // namespace upstream_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_CONN_H_
