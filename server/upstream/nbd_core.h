// server/upstream/nbd_core.h — one upstream's pool of libnbd handles
// (internal to server/upstream): which handles are live, the negotiated
// info, generations, reconnects with backoff, and the spawned server.
//
// The pool wants 1 handle, or config.connections (default 2) once the
// server advertised multi-conn or the export is read-only. Attempts run on
// the engine's timer thread with jittered exponential backoff (100 ms
// doubling to 5 s; the first attempt after a loss is immediate), and
// restart a spawned server that exited. Generation() increases on every
// reconnect round that brings a handle up and when the last live handle is
// lost (see nbd_upstream.h); OnGenerationChange runs on the timer thread.
//
// Ownership: the NbdUpstream facade and every Conn hold the Core by
// shared_ptr; timer tasks hold it by weak_ptr (a task of a Core that is gone
// does nothing). Close() stops reconnecting and closes every handle at once
// (what is in flight completes with Close's reason, never with a late
// answer); Shutdown() does that too, then stops the spawned server.
//
// Thread-safety: all methods are thread-safe; mu_ is never held during
// libnbd calls that may block or while callbacks run.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_CORE_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_CORE_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/common/mutex.h"
#include "server/upstream/nbd_conn.h"
#include "server/upstream/nbd_engine.h"
#include "server/upstream/spawned_server.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace upstream_internal {

// Reconnect backoff bounds.
inline constexpr absl::Duration kMinBackoff = absl::Milliseconds(100);
inline constexpr absl::Duration kMaxBackoff = absl::Seconds(5);

class Core : public ConnOwner, public std::enable_shared_from_this<Core> {
 public:
  Core(const blockmeta::v1::ExportConfig& config,
       std::unique_ptr<SpawnedServer> server, NbdEngine& engine);

  void Start() { ScheduleAttempt(absl::Now()); }
  // Upstream::Close: stops reconnecting and abandons every handle (closed
  // at once, or by the driver callback running on it); the spawned server
  // keeps running until Shutdown. Never blocks on the server.
  void Close(const absl::Status& why);
  // Close (if not yet), then stops the spawned server (may take its grace
  // period).
  void Shutdown();

  // Facade queries.
  bool Ready() const {
    sync::MutexLock lock(&mu_);
    return !live_.empty();
  }
  bool WaitReady(absl::Time deadline) {
    sync::MutexLock lock(&mu_);
    // A spawned server that died before the first connection failed to
    // start: say so now (LastError has its exit), not at the deadline.
    while (live_.empty() && !stopped_ && !start_failed_) {
      if (mu_.WaitWithDeadline(&cv_, deadline)) break;
    }
    return !live_.empty();
  }
  absl::StatusOr<UpstreamInfo> Info() const {
    sync::MutexLock lock(&mu_);
    if (!have_info_) return NotReadyLocked();
    return info_;
  }
  absl::StatusOr<UpstreamInfo> ConnectedInfo() const {
    sync::MutexLock lock(&mu_);
    if (live_.empty() || !have_info_) return NotReadyLocked();
    return info_;
  }
  std::string LastError() const {
    sync::MutexLock lock(&mu_);
    return live_.empty() ? last_error_ : "";
  }
  uint64_t Generation() const {
    sync::MutexLock lock(&mu_);
    return generation_;
  }
  void SetOnGenerationChange(std::function<void()> fn) {
    sync::MutexLock lock(&mu_);
    on_generation_change_ = std::move(fn);
  }
  int LiveConnections() const {
    sync::MutexLock lock(&mu_);
    return static_cast<int>(live_.size());
  }
  UpstreamStats Stats() const;
  pid_t ServerPid() const { return server_ != nullptr ? server_->pid() : -1; }
  std::string ServerSocket() const {
    return server_ != nullptr ? server_->socket_path() : "";
  }

  // The least busy live connection; null when none is up.
  std::shared_ptr<Conn> Pick();
  // Close()'s reason (OK before).
  absl::Status closed_status() const {
    sync::MutexLock lock(&mu_);
    return closed_;
  }
  absl::Status NotReady() const {
    sync::MutexLock lock(&mu_);
    return NotReadyLocked();
  }

  // ConnOwner (see nbd_conn.h).
  bool OnHandshakeDone(Conn* c, UpstreamInfo info) override;
  void OnHandshakeFailed(Conn* c, const absl::Status& why) override;
  void OnDraining(Conn* c) override;
  std::shared_ptr<Conn> Forget(Conn* c, bool lost,
                               const absl::Status& why) override;
  const std::string& name() const override { return name_; }
  absl::Duration timeout() const override { return timeout_; }
  NbdEngine& engine() override { return engine_; }
  Counters& counters() override { return counters_; }
  std::string ServerExit() override {
    if (server_ == nullptr || server_->Running()) return "";
    return server_->ExitDescription();
  }

 private:
  absl::Status NotReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    mu_.AssertHeld();
    if (!closed_.ok()) return closed_;
    return absl::UnavailableError(
        absl::StrCat("export ", name_, ": upstream not connected",
                     last_error_.empty() ? "" : ": ", last_error_));
  }
  void ScheduleAttempt(absl::Time when);
  void ScheduleAttemptLocked(absl::Time when)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RetryLaterLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `exit` ("" = none): the spawned server's exit or start error. Before
  // the first connection it is a start failure: LastError says so and
  // WaitReady returns.
  void NoteServerExitLocked(const std::string& exit)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void GenerationChangedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Timer thread: restarts a dead spawned server, starts missing handshakes.
  void Attempt();
  void NotifyGenerationChange();
  bool Wanted(const std::vector<std::shared_ptr<Conn>>& list, Conn* c) const;

  // Constant after construction.
  const std::string name_;
  const std::string uri_;  // for nbd_uri upstreams
  const int max_connections_;
  const absl::Duration timeout_;
  const bool force_read_only_;
  const std::unique_ptr<SpawnedServer> server_;  // internally synchronized
  NbdEngine& engine_;
  Counters counters_;

  mutable sync::Mutex mu_;
  absl::CondVar cv_;  // signalled when live_ changes or on stop
  std::vector<std::shared_ptr<Conn>> live_ ABSL_GUARDED_BY(mu_);
  // Handshaking or draining: driven, not used for commands.
  std::vector<std::shared_ptr<Conn>> others_ ABSL_GUARDED_BY(mu_);
  int connecting_ ABSL_GUARDED_BY(mu_) = 0;
  int target_ ABSL_GUARDED_BY(mu_) = 1;  // handles wanted (multi-conn)
  bool have_info_ ABSL_GUARDED_BY(mu_) = false;
  UpstreamInfo info_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_) = "connecting";
  // What the spawned server said when it last exited (kept in errors until
  // a connection succeeds: a restarted server that fails again may reset
  // the socket before its own exit is seen).
  std::string last_exit_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t notified_generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool notify_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  bool round_bumped_ ABSL_GUARDED_BY(mu_) = false;  // this round's bump done
  bool ever_connected_ ABSL_GUARDED_BY(mu_) = false;
  bool start_failed_ ABSL_GUARDED_BY(mu_) = false;  // NoteServerExitLocked
  bool attempt_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time attempt_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_) = kMinBackoff;
  // (std:: rather than absl::BitGen: Debian's absl random pool is not
  // TSan-instrumented and reports false races.)
  std::minstd_rand rng_ ABSL_GUARDED_BY(mu_){std::random_device{}()};
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status closed_ ABSL_GUARDED_BY(mu_);  // Close()'s reason
  uint64_t reconnects_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t lost_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t soft_disconnects_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<void()> on_generation_change_ ABSL_GUARDED_BY(mu_);
};

}  // namespace upstream_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_CORE_H_
