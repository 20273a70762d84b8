// server/common/worker_pool.cc — see worker_pool.h.
#include "server/common/worker_pool.h"

#include <utility>

namespace blockmeta {

WorkerPool::WorkerPool(size_t threads) {
  if (threads == 0) threads = 1;
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

WorkerPool::~WorkerPool() { StopAndJoin(); }

void WorkerPool::StopAndJoin() {
  {
    sync::MutexLock lock(&mu_);
    stopping_ = true;
  }
  work_.SignalAll();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

bool WorkerPool::Schedule(absl::AnyInvocable<void() &&> task) {
  {
    sync::MutexLock lock(&mu_);
    if (stopping_) return false;  // `task` is destroyed unrun (after unlock)
    queue_.push_back(std::move(task));
  }
  work_.Signal();
  return true;
}

size_t WorkerPool::QueueLength() const {
  sync::MutexLock lock(&mu_);
  return queue_.size();
}

void WorkerPool::Run() {
  while (true) {
    absl::AnyInvocable<void() &&> task;
    {
      sync::MutexLock lock(&mu_);
      while (!stopping_ && queue_.empty()) {
        mu_.WaitWithDeadline(&work_, absl::InfiniteFuture());
      }
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(task)();
  }
}

}  // namespace blockmeta
