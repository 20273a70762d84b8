// tests/testing/async_disk.h — a fake asynchronous block-status upstream
// for the cache's unit tests (testonly).
//
// A disk of alternating data/hole runs whose fetches are queued until the
// test (or an auto-completing thread) answers them, so every interleaving
// is chosen, not slept for. Writes flip ranges. With a limit set it answers
// at most that many bytes per call (a window-limited upstream). Counts
// calls and the most fetches ever queued at once.
#ifndef BLOCKMETA_TESTS_TESTING_ASYNC_DISK_H_
#define BLOCKMETA_TESTS_TESTING_ASYNC_DISK_H_

#include <algorithm>
#include <cstdint>
#include <deque>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/cache/extent.h"
#include "server/cache/fetcher.h"
#include "server/common/mutex.h"

namespace blockmeta {
namespace testing {

// A disk of alternating data/hole runs of `run` bytes whose fetches are
// queued until the test (or an auto-completing thread) answers them. With
// `limit` set it answers at most that many bytes per call (a window-limited
// upstream such as nbdkit's blocksize filter in front of VDDK).
class AsyncDisk {
 public:
  struct Pending {
    uint64_t offset;
    uint64_t length;
    FetchDone done;
  };

  AsyncDisk(uint64_t size, uint64_t run) : size_(size), run_(run) {}

  uint32_t FlagsAt(uint64_t off) const {
    sync::MutexLock l(&mu_);
    return FlagsAtLocked(off);
  }
  ExtentList Truth(uint64_t offset, uint64_t len) const {
    sync::MutexLock l(&mu_);
    return TruthLocked(offset, len);
  }
  // Flips the flags of [a, b) (a write).
  void Flip(uint64_t a, uint64_t b) {
    sync::MutexLock l(&mu_);
    flipped_.emplace_back(a, b);
  }

  AsyncFetcher Fetcher() {
    return [this](uint64_t offset, uint64_t length, FetchDone done) {
      sync::MutexLock l(&mu_);
      ++calls_;
      EXPECT_LT(offset, size_);
      EXPECT_LE(offset + length, size_) << "fetch past the export end";
      queue_.push_back(Pending{offset, length, std::move(done)});
      max_pending_ = std::max(max_pending_, queue_.size());
      cv_.SignalAll();
    };
  }

  // Waits until at least n fetches are queued.
  bool WaitPending(size_t n, absl::Duration timeout = absl::Seconds(10)) {
    const absl::Time deadline = absl::Now() + timeout;
    sync::MutexLock l(&mu_);
    while (queue_.size() < n) {
      if (mu_.WaitWithDeadline(&cv_, deadline)) return queue_.size() >= n;
    }
    return true;
  }
  size_t pending() const {
    sync::MutexLock l(&mu_);
    return queue_.size();
  }
  std::vector<std::pair<uint64_t, uint64_t>> PendingRanges() const {
    sync::MutexLock l(&mu_);
    std::vector<std::pair<uint64_t, uint64_t>> out;
    for (const Pending& p : queue_) out.emplace_back(p.offset, p.length);
    return out;
  }
  int calls() const {
    sync::MutexLock l(&mu_);
    return calls_;
  }
  size_t max_pending() const {
    sync::MutexLock l(&mu_);
    return max_pending_;
  }

  // Answers the i-th queued fetch (the truth now, or `status`).
  void Complete(size_t i, const absl::Status& status = absl::OkStatus()) {
    Pending p;
    ExtentList answer;
    {
      sync::MutexLock l(&mu_);
      ASSERT_LT(i, queue_.size());
      p = std::move(queue_[i]);
      queue_.erase(queue_.begin() + i);
      uint64_t len = std::min(p.length, size_ - p.offset);
      if (limit_ != 0) len = std::min(len, limit_);
      answer = TruthLocked(p.offset, len);
    }
    if (status.ok()) {
      std::move(p.done)(std::move(answer));
    } else {
      std::move(p.done)(status);
    }
  }
  // What the i-th queued fetch would be answered now.
  ExtentList AnswerFor(size_t i) const {
    sync::MutexLock l(&mu_);
    const Pending& p = queue_[i];
    uint64_t len = std::min(p.length, size_ - p.offset);
    if (limit_ != 0) len = std::min(len, limit_);
    return TruthLocked(p.offset, len);
  }
  // Answers the i-th queued fetch with `answer` (read before a write).
  void CompleteWith(size_t i, ExtentList answer) {
    Pending p;
    {
      sync::MutexLock l(&mu_);
      p = std::move(queue_[i]);
      queue_.erase(queue_.begin() + i);
    }
    std::move(p.done)(std::move(answer));
  }
  void CompleteAll() {
    while (pending() > 0) Complete(0);
  }

  // Answers every fetch on a thread as it arrives, until stopped.
  void StartAutoComplete() {
    {
      sync::MutexLock l(&mu_);
      stop_ = false;  // may be restarted after StopAutoComplete()
    }
    auto_ = std::thread([this] {
      for (;;) {
        {
          sync::MutexLock l(&mu_);
          while (queue_.empty() && !stop_) {
            mu_.WaitWithDeadline(&cv_, absl::InfiniteFuture());
          }
          if (queue_.empty() && stop_) return;
        }
        Complete(0);
      }
    });
  }
  void StopAutoComplete() {
    {
      sync::MutexLock l(&mu_);
      stop_ = true;
      cv_.SignalAll();
    }
    if (auto_.joinable()) auto_.join();
  }
  ~AsyncDisk() {
    StopAutoComplete();
    CompleteAll();
  }

  void set_limit(uint64_t limit) {
    sync::MutexLock l(&mu_);
    limit_ = limit;
  }
  uint64_t size() const { return size_; }

 private:
  uint32_t FlagsAtLocked(uint64_t off) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    uint32_t f = (off / run_) % 2 ? kStateHole | kStateZero : 0;
    for (const auto& [a, b] : flipped_) {
      if (a <= off && off < b) f ^= kStateHole | kStateZero;
    }
    return f;
  }
  ExtentList TruthLocked(uint64_t offset, uint64_t len) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Walk unit by unit at the granularity of runs and flips (tests keep
    // both multiples of 4 KiB).
    ExtentList out;
    for (uint64_t pos = offset; pos < offset + len;) {
      uint64_t next = std::min(offset + len, (pos / 4096 + 1) * 4096);
      const uint32_t f = FlagsAtLocked(pos);
      if (!out.empty() && out.back().flags == f) {
        out.back().length += next - pos;
      } else {
        out.push_back(Extent{pos, next - pos, f});
      }
      pos = next;
    }
    return out;
  }

  const uint64_t size_;
  const uint64_t run_;
  mutable sync::Mutex mu_;
  absl::CondVar cv_;
  std::deque<Pending> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<uint64_t, uint64_t>> flipped_ ABSL_GUARDED_BY(mu_);
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  size_t max_pending_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t limit_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread auto_;
};

}  // namespace testing
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_ASYNC_DISK_H_
