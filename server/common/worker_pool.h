// server/common/worker_pool.h — a fixed pool of threads that run blocking
// work (upstream calls made on behalf of gRPC calls) off gRPC's callback
// threads.
//
// Schedule() never blocks: tasks queue without bound, so callers must do
// their own admission control (the gRPC layer caps in-flight calls).
// The destructor stops accepting work (from then on Schedule refuses: it
// returns false and destroys the task unrun, even when called by a task
// still running), runs every task already accepted, and joins.
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_COMMON_WORKER_POOL_H_
#define BLOCKMETA_SERVER_COMMON_WORKER_POOL_H_

#include <cstddef>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "server/common/mutex.h"

namespace blockmeta {

class WorkerPool {
 public:
  explicit WorkerPool(size_t threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `task` and returns true, or returns false once destruction has
  // begun (the task is then destroyed without running).
  bool Schedule(absl::AnyInvocable<void() &&> task) ABSL_LOCKS_EXCLUDED(mu_);
  // Tasks queued but not started.
  size_t QueueLength() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run();
  // Stops the workers and joins them (the destructor, or a constructor
  // that could not start them all).
  void StopAndJoin() ABSL_LOCKS_EXCLUDED(mu_);

  mutable sync::Mutex mu_;
  absl::CondVar work_;  // signalled when a task is queued or stopping_ set
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Constant after construction.
  std::vector<std::thread> threads_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_WORKER_POOL_H_
