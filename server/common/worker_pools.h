// server/common/worker_pools.h — ONE bounded pool of threads for the
// blocking work of every export (upstream calls made on behalf of gRPC
// calls), with a per-export cap on concurrent work and round-robin service.
//
// Each export has a lane: a FIFO of its tasks and the number running. A
// thread takes the next lane from a ready ring (lanes with queued tasks and
// fewer than `per_export_cap` running), runs one task, and puts the lane
// back at the END of the ring, so exports are served in turn however many
// tasks one of them queued, and a slow export can hold at most
// `per_export_cap` threads: the others keep `threads - per_export_cap`.
// Lanes exist only while they have work: an idle export costs no thread and
// no memory, so thousands of exports cost the same threads as one.
//
// Schedule() never blocks: tasks queue without bound, so callers must do
// their own admission control (the gRPC layer caps in-flight calls per export
// and globally). The destructor stops accepting work, runs what is queued,
// and joins. Cost: Schedule and each task pick are O(1) under one mutex.
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_COMMON_WORKER_POOLS_H_
#define BLOCKMETA_SERVER_COMMON_WORKER_POOLS_H_

#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "server/common/mutex.h"

namespace blockmeta {

class WorkerPools {
 public:
  // threads 0 means 1; per_export_cap 0 means max(1, threads / 4).
  WorkerPools(size_t threads, size_t per_export_cap);
  ~WorkerPools();
  WorkerPools(const WorkerPools&) = delete;
  WorkerPools& operator=(const WorkerPools&) = delete;

  void Schedule(const std::string& export_name,
                absl::AnyInvocable<void() &&> task) ABSL_LOCKS_EXCLUDED(mu_);

  // A handle that schedules into one export's lane, so callers can write
  // pools->For(name)->Schedule(task). Cheap to copy; holds no lane.
  class ExportLane {
   public:
    ExportLane(WorkerPools* pools, std::string name)
        : pools_(pools), name_(std::move(name)) {}
    void Schedule(absl::AnyInvocable<void() &&> task) {
      pools_->Schedule(name_, std::move(task));
    }
    ExportLane* operator->() { return this; }

   private:
    WorkerPools* pools_;
    std::string name_;
  };
  ExportLane For(const std::string& export_name) {
    return ExportLane(this, export_name);
  }

  size_t threads() const { return threads_.size(); }
  size_t per_export_cap() const { return cap_; }
  // Tasks of one export queued / running now (0 for an idle export).
  size_t Queued(const std::string& export_name) const ABSL_LOCKS_EXCLUDED(mu_);
  size_t Running(const std::string& export_name) const ABSL_LOCKS_EXCLUDED(mu_);
  // Lanes alive (exports with queued or running work).
  size_t Lanes() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Lane {
    std::string name;
    std::deque<absl::AnyInvocable<void() &&>> tasks;
    size_t running = 0;
    bool in_ring = false;
  };
  void Run();
  // Stops the workers and joins them (the destructor, or a constructor
  // that could not start them all).
  void StopAndJoin() ABSL_LOCKS_EXCLUDED(mu_);
  // Puts `lane` on the ring if it has work and room.
  void MaybeReadyLocked(Lane* lane) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  size_t cap_;
  std::vector<std::thread> threads_;

  mutable sync::Mutex mu_;
  absl::CondVar work_;  // signalled when the ring gains a lane or stopping_
  absl::flat_hash_map<std::string, std::unique_ptr<Lane>> lanes_
      ABSL_GUARDED_BY(mu_);
  std::deque<Lane*> ring_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_WORKER_POOLS_H_
