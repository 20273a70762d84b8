// server/cache/eviction.cc — coarse-LRU eviction passes (see eviction.h).
#include "server/cache/eviction.h"

#include <algorithm>
#include <functional>

namespace blockmeta {
namespace cache_internal {
namespace {

// Intervals visited per lock hold by eviction passes, so lookups and fills
// of a big key are not stalled for a whole pass.
constexpr size_t kSweepChunk = 1024;
// Ages sampled per eviction pass to choose the cutoff.
constexpr size_t kMaxSamples = 1 << 16;

}  // namespace

void Evictor::MaybeEvict(absl::FunctionRef<std::vector<KeyState*>()> keys_fn,
                         absl::FunctionRef<int64_t()> now_ns) {
  if (!OverLimit()) return;
  sync::MutexLock evict_lock(&evict_mu_);
  const int64_t low_water = limit_ - limit_ / 8;
  bool spare_young = true;
  for (int pass = 0; pass < 64 && OverLimit(); ++pass) {
    const std::vector<KeyState*> keys = keys_fn();
    const uint32_t now = Now();
    uint64_t entries = 0;
    for (KeyState* k : keys) {
      sync::ReaderMutexLock l(&k->mu);
      entries += k->map.size();
    }
    if (entries == 0) return;
    const uint64_t stride = entries / kMaxSamples + 1;
    std::vector<uint32_t> ages;
    ages.reserve(std::min<uint64_t>(entries, kMaxSamples) + 16);
    uint64_t seen = 0;
    for (KeyState* k : keys) {
      uint64_t resume = 0;
      bool more = true;
      while (more) {
        sync::ReaderMutexLock l(&k->mu);
        auto it = k->map.lower_bound(resume);
        for (size_t n = 0; it != k->map.end() && n < kSweepChunk; ++it, ++n) {
          if (seen++ % stride == 0) {
            ages.push_back(Age(now, it->second.tick.Get()));
          }
        }
        more = it != k->map.end();
        if (more) resume = it->first;
      }
    }
    if (ages.empty()) return;
    const int64_t mem = total_mem_.load(std::memory_order_relaxed);
    const double fraction =
        mem <= low_water ? 0.0 : double(mem - low_water) / double(mem);
    size_t want = static_cast<size_t>(fraction * double(ages.size()) + 1.0);
    want = std::min(std::max<size_t>(want, 1), ages.size());
    std::nth_element(ages.begin(), ages.begin() + (want - 1), ages.end(),
                     std::greater<uint32_t>());
    // A pass that found nothing (concurrent touches or invalidations got
    // there first) samples again, up to the pass limit.
    // Passes spare age 0 (the newest fill and what was just read: the part
    // of a fill nearest its caller) until one finds nothing else to evict;
    // then they do not, so the bound always holds.
    const uint32_t cutoff =
        std::max<uint32_t>(ages[want - 1], spare_young ? 1 : 0);
    if (EvictPass(keys, now, cutoff, now_ns) == 0) spare_young = false;
  }
}

uint64_t Evictor::EvictPass(const std::vector<KeyState*>& keys, uint32_t now,
                            uint32_t cutoff_age,
                            absl::FunctionRef<int64_t()> now_ns_fn) {
  uint64_t evicted = 0;
  for (KeyState* k : keys) {
    uint64_t resume = 0;
    bool more = true;
    while (more) {
      sync::MutexLock l(&k->mu);
      const int64_t ttl = k->ttl_ns.load(std::memory_order_relaxed);
      const int64_t now_ns = ttl == kNoTtl ? 0 : now_ns_fn();
      auto it = k->map.lower_bound(resume);
      uint64_t n = 0;
      for (size_t visited = 0; it != k->map.end() && visited < kSweepChunk;
           ++visited) {
        if (Age(now, it->second.tick.Get()) >= cutoff_age ||
            Expired(it->second, now_ns, ttl)) {
          it = k->map.erase(it);
          ++n;
        } else {
          ++it;
        }
      }
      k->evictions.Add(n);
      evicted += n;
      more = it != k->map.end();
      if (more) resume = it->first;
    }
  }
  return evicted;
}

}  // namespace cache_internal
}  // namespace blockmeta
