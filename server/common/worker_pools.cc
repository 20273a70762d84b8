// server/common/worker_pools.cc — see worker_pools.h.
#include "server/common/worker_pools.h"

#include <algorithm>
#include <utility>

namespace blockmeta {

WorkerPools::WorkerPools(size_t threads, size_t per_export_cap) {
  if (threads == 0) threads = 1;
  cap_ = per_export_cap != 0 ? std::min(per_export_cap, threads)
                             : std::max<size_t>(1, threads / 4);
  threads_.reserve(threads);
  try {
    for (size_t i = 0; i < threads; ++i) {
      threads_.emplace_back([this] { Run(); });
    }
  } catch (...) {   // std::system_error: no thread left to create
    StopAndJoin();  // never destroy a joinable std::thread (terminate)
    throw;
  }
}

WorkerPools::~WorkerPools() { StopAndJoin(); }

void WorkerPools::StopAndJoin() {
  {
    sync::MutexLock lock(&mu_);
    stopping_ = true;
  }
  work_.SignalAll();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

void WorkerPools::MaybeReadyLocked(Lane* lane) {
  mu_.AssertHeld();
  if (!lane->in_ring && !lane->tasks.empty() && lane->running < cap_) {
    lane->in_ring = true;
    ring_.push_back(lane);
    work_.Signal();
  }
}

void WorkerPools::Schedule(const std::string& export_name,
                           absl::AnyInvocable<void() &&> task) {
  sync::MutexLock lock(&mu_);
  std::unique_ptr<Lane>& lane = lanes_[export_name];
  if (lane == nullptr) {
    lane = std::make_unique<Lane>();
    lane->name = export_name;
  }
  lane->tasks.push_back(std::move(task));
  MaybeReadyLocked(lane.get());
}

size_t WorkerPools::Queued(const std::string& export_name) const {
  sync::MutexLock lock(&mu_);
  auto it = lanes_.find(export_name);
  return it == lanes_.end() ? 0 : it->second->tasks.size();
}

size_t WorkerPools::Running(const std::string& export_name) const {
  sync::MutexLock lock(&mu_);
  auto it = lanes_.find(export_name);
  return it == lanes_.end() ? 0 : it->second->running;
}

size_t WorkerPools::Lanes() const {
  sync::MutexLock lock(&mu_);
  return lanes_.size();
}

void WorkerPools::Run() {
  while (true) {
    absl::AnyInvocable<void() &&> task;
    Lane* lane = nullptr;
    {
      sync::MutexLock lock(&mu_);
      while (!stopping_ && ring_.empty()) {
        mu_.WaitWithDeadline(&work_, absl::InfiniteFuture());
      }
      if (ring_.empty()) return;  // stopping and drained
      lane = ring_.front();
      ring_.pop_front();
      lane->in_ring = false;
      task = std::move(lane->tasks.front());
      lane->tasks.pop_front();
      ++lane->running;
      MaybeReadyLocked(lane);  // to the back of the ring: round-robin
    }
    std::move(task)();
    task = nullptr;  // destroy captures before the lane may go
    sync::MutexLock lock(&mu_);
    --lane->running;
    MaybeReadyLocked(lane);
    if (lane->tasks.empty() && lane->running == 0 && !lane->in_ring) {
      lanes_.erase(lane->name);  // idle exports cost nothing
    }
  }
}

}  // namespace blockmeta
