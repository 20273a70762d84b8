// server/upstream/nbd_engine.h — the few threads that drive every libnbd
// handle of the process.
//
// An NbdEngine owns `drivers` driver threads (default 2) and one timer
// thread, whatever the number of upstreams or handles. Each driver waits
// with epoll on the handles assigned to it (round robin) plus an eventfd,
// in the direction libnbd asks for (nbd_aio_get_direction), then calls
// nbd_aio_notify_read / nbd_aio_notify_write and hands the handle's owner
// the result (NbdDriven::OnEvents). Every ~100 ms each driver also calls
// NbdDriven::OnTick on all its handles, which is where command timeouts,
// handshake deadlines and soft-disconnect bounds are checked. The timer
// thread runs delayed tasks (reconnect backoff, connects, generation
// callbacks); a task must not block for long (it delays the others).
//
// Commands may be issued from any thread (libnbd handles are thread-safe):
// after issuing, call Rearm() so the driver also waits for POLLOUT when a
// request could not be written at once.
//
// The engine watches a dup() of the handle's socket, so libnbd closing or
// reusing its descriptor number can never make epoll watch a stranger's
// socket; during the handshake (when libnbd may move to another socket, e.g.
// the next address of a host name) Refresh() re-registers on change.
//
// Invariants: a driver holds a reference to an NbdDriven for as long as it
// calls into it; Unwatch() returns only once no driver is inside a callback
// for it (at once when called from that callback's own thread). No engine
// lock is held while libnbd runs or while callbacks run.
//
// Thread-safety: all methods are thread-safe. Default() is created on first
// use and never destroyed (its threads live as long as the process).
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_ENGINE_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_ENGINE_H_

#include <libnbd.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <queue>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/common/mutex.h"

namespace blockmeta {

class NbdEngine;

// One libnbd handle the engine drives. The owner implements the callbacks;
// they run on a driver thread, never concurrently for the same object.
class NbdDriven {
 public:
  virtual ~NbdDriven() = default;
  virtual nbd_handle* handle() const = 0;
  // After libnbd processed a readiness event. `notify_error` is libnbd's
  // message when the notify call failed (read on the driver thread, where
  // libnbd's per-thread error lives), else empty.
  virtual void OnEvents(absl::string_view notify_error) = 0;
  // About every 100 ms.
  virtual void OnTick(absl::Time now) = 0;

 private:
  friend class NbdEngine;
  // Registration, managed by the engine under arm_mu_.
  sync::Mutex arm_mu_;
  int driver_ ABSL_GUARDED_BY(arm_mu_) = -1;
  uint64_t id_ ABSL_GUARDED_BY(arm_mu_) = 0;
  int fd_ ABSL_GUARDED_BY(arm_mu_) = -1;  // our dup of libnbd's socket
  uint32_t armed_ ABSL_GUARDED_BY(arm_mu_) = 0;
};

class NbdEngine {
 public:
  // The process-wide engine (2 drivers).
  static NbdEngine& Default();

  explicit NbdEngine(int drivers);
  ~NbdEngine();  // stops the threads; everything must be unwatched
  NbdEngine(const NbdEngine&) = delete;
  NbdEngine& operator=(const NbdEngine&) = delete;

  // Starts driving `d` (its handle must have a socket: connecting or
  // connected). FAILED_PRECONDITION when it has none, INTERNAL when dup or
  // epoll fails.
  absl::Status Watch(const std::shared_ptr<NbdDriven>& d);
  // Re-reads the wanted direction; call after issuing from another thread.
  void Rearm(NbdDriven* d);
  // Re-registers when libnbd moved to another socket (handshake only).
  void Refresh(NbdDriven* d);
  // Stops driving `d`; see the invariants above. Idempotent.
  void Unwatch(NbdDriven* d);

  // Runs `fn` on the timer thread at or after `when`.
  void RunAt(absl::Time when, std::function<void()> fn);

  // Threads this engine runs (drivers + timer).
  int threads() const { return static_cast<int>(drivers_.size()) + 1; }
  // True on one of this engine's driver or timer threads.
  bool OnEngineThread() const;

 private:
  struct Driver {
    int epoll_fd = -1;
    int wake_fd = -1;
    std::thread thread;
    sync::Mutex mu;
    absl::CondVar cv;  // signalled when busy changes
    absl::flat_hash_map<uint64_t, std::shared_ptr<NbdDriven>> watched
        ABSL_GUARDED_BY(mu);
    NbdDriven* busy ABSL_GUARDED_BY(mu) = nullptr;
    bool stop ABSL_GUARDED_BY(mu) = false;
  };
  struct Task {
    absl::Time when;
    uint64_t seq;
    std::function<void()> fn;
    bool operator>(const Task& o) const {
      return when != o.when ? when > o.when : seq > o.seq;
    }
  };

  void DriverLoop(Driver* d);
  // Calls `fn` on `x` with `x` marked busy (so Unwatch waits for it).
  template <typename Fn>
  void CallBusy(Driver* d, uint64_t id, Fn fn);
  void TimerLoop();
  // Registers `x` with driver `di` on `fd` (already dup'ed).
  absl::Status RegisterLocked(NbdDriven* x, int di, int fd)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(x->arm_mu_);
  static uint32_t WantedEvents(nbd_handle* h);

  std::vector<std::unique_ptr<Driver>> drivers_;  // constant after ctor
  std::thread timer_;

  sync::Mutex mu_;  // ids, round robin, timer queue
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  int next_driver_ ABSL_GUARDED_BY(mu_) = 0;
  absl::CondVar timer_cv_;
  std::priority_queue<Task, std::vector<Task>, std::greater<Task>> tasks_
      ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_ENGINE_H_
