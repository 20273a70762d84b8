// server/cache/eviction.h — the memory bound of all interval maps and the
// coarse-LRU eviction that keeps it (internal to server/cache).
//
// Owns the cache-wide byte total (fed by every key's MemAccount), the LRU
// clock (advances once per fill; readers stamp intervals with it) and the
// eviction passes. When the total exceeds the limit, MaybeEvict() erases
// the oldest intervals of all keys (and expired ones) down to 7/8 of the
// limit. Eviction only forgets; it never changes an answer.
//
// Locks: evict_mu_ serializes passes and is taken before the cache's key
// table lock and any KeyState::mu (the `keys` callback takes the table lock
// itself). Passes hold a key's lock for at most kSweepChunk intervals.
#ifndef BLOCKMETA_SERVER_CACHE_EVICTION_H_
#define BLOCKMETA_SERVER_CACHE_EVICTION_H_

#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "server/cache/key_state.h"
#include "server/common/mutex.h"

namespace blockmeta {
namespace cache_internal {

class Evictor {
 public:
  explicit Evictor(uint64_t memory_limit_bytes)
      : limit_(static_cast<int64_t>(std::min<uint64_t>(
            memory_limit_bytes, std::numeric_limits<int64_t>::max()))) {}

  // The total every key's MemAccount adds into.
  std::atomic<int64_t>* total() { return &total_mem_; }
  bool OverLimit() const {
    return total_mem_.load(std::memory_order_relaxed) > limit_;
  }
  // Over 3/4 of the limit: background work (prefetch) gives way.
  bool NearLimit() const {
    return total_mem_.load(std::memory_order_relaxed) > limit_ - limit_ / 4;
  }
  // The LRU clock as readers stamp it, and a new tick for a fill.
  uint32_t Now() const { return lru_clock_.load(std::memory_order_relaxed); }
  uint32_t NextTick() {
    return lru_clock_.fetch_add(1, std::memory_order_relaxed) + 1;
  }

  // Evicts down to 7/8 of the limit when over it. `keys` lists every key
  // (it may take the key table lock); `now_ns` is the TTL clock. Call with
  // no key lock held.
  void MaybeEvict(absl::FunctionRef<std::vector<KeyState*>()> keys,
                  absl::FunctionRef<int64_t()> now_ns);

 private:
  // Erases every interval at least `cutoff_age` old (or expired); returns
  // how many.
  static uint64_t EvictPass(const std::vector<KeyState*>& keys, uint32_t now,
                            uint32_t cutoff_age,
                            absl::FunctionRef<int64_t()> now_ns);

  const int64_t limit_;
  std::atomic<int64_t> total_mem_{0};
  // LRU clock: advances once per fill.
  std::atomic<uint32_t> lru_clock_{1};
  // Serializes eviction passes.
  sync::Mutex evict_mu_;
};

}  // namespace cache_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_EVICTION_H_
