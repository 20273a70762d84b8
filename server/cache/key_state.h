// server/cache/key_state.h — what the cache keeps per (export, context), and
// the in-flight fetch records (internal to server/cache).
//
// A KeyState is created on a key's first use and lives as long as the cache
// (retired, never freed, when its export is removed), so lock-free readers
// may keep plain pointers to it; completions of its fetches hold a
// shared_ptr. Its mutex guards the interval map, the in-flight records
// (including their mutable fields) and the read-ahead run; counters, the
// TTL and memory accounting are relaxed atomics.
//
// Interval map invariants: disjoint, nonempty intervals keyed by start;
// adjacent intervals have different flags (merged otherwise, keeping the
// oldest `born_ns`, so TTL never extends).
#ifndef BLOCKMETA_SERVER_CACHE_KEY_STATE_H_
#define BLOCKMETA_SERVER_CACHE_KEY_STATE_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/cache/cache_key.h"
#include "server/cache/extent.h"
#include "server/cache/fetcher.h"
#include "server/cache/granule.h"
#include "server/cache/memory_account.h"
#include "server/common/mutex.h"

namespace blockmeta {
namespace cache_internal {

inline constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();
inline constexpr int64_t kNoTtl = std::numeric_limits<int64_t>::max();
// Memory one cached interval takes, for planning (a 32-byte btree slot plus
// node overhead; see extent_cache.h's Cost paragraph).
inline constexpr uint64_t kIntervalBytes = 48;

inline uint64_t SatAdd(uint64_t a, uint64_t b) {
  return b > kMaxU64 - a ? kMaxU64 : a + b;
}

inline int64_t TtlNs(absl::Duration ttl) {
  if (ttl == absl::InfiniteDuration()) return kNoTtl;
  return std::max<int64_t>(0, absl::ToInt64Nanoseconds(ttl));
}

class Counter {
 public:
  void Add(uint64_t n) {
    if (n != 0) v_.fetch_add(n, std::memory_order_relaxed);  // RMW costs
  }
  uint64_t Get() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

// One known interval [start, end) (start is the map key).
struct Interval {
  uint64_t end;
  // When the upstream was asked (ns since the Unix epoch, TTL clock); a
  // merged interval keeps the oldest, so it expires no later than any part.
  int64_t born_ns;
  uint32_t flags;
  mutable LruTick tick;
};
static_assert(sizeof(Interval) == 24, "32-byte btree slots");

using IntervalMap =
    absl::btree_map<uint64_t, Interval, std::less<uint64_t>,
                    CountingAllocator<std::pair<const uint64_t, Interval>>>;

inline bool Expired(const Interval& iv, int64_t now_ns, int64_t ttl_ns) {
  return ttl_ns != kNoTtl && now_ns - iv.born_ns >= ttl_ns;
}

// One upstream block-status call of a key, in flight or completed. Shared by
// the key's in-flight list, the callers waiting for it and its completion.
// The mutable fields are protected by the owning KeyState::mu (a member of
// another object, so not annotated).
struct Fetch {
  Fetch(uint64_t i, uint64_t s, uint64_t e, bool ra)
      : id(i), start(s), end(e), read_ahead(ra) {}
  const uint64_t id;
  const uint64_t start;  // the window asked for: [start, end)
  const uint64_t end;
  const bool read_ahead;  // scheduled by read-ahead (not a caller's miss)
  bool prefetch = false;  // scheduled by whole-map prefetch (set once, at
                          // registration, under the key lock)
  // First byte (>= start) an invalidation touched while in flight.
  uint64_t poison_from = kMaxU64;
  bool done = false;
  bool read = false;  // a Get() used this read-ahead window
  absl::Status status;
  ExtentList answer;       // when done and ok: validated, clipped, whole
  uint64_t clean_end = 0;  // answer before the poison mark ends here
};
using FetchPtr = std::shared_ptr<Fetch>;

// The read-ahead run of one key (at most one scan per key is followed).
// Its logic lives in read_ahead.h.
struct ReadAheadRun {
  uint64_t window = 0;    // L: bytes per read-ahead fetch; 0 = no run
  uint64_t run_end = 0;   // end of the furthest answer of the run
  uint64_t frontier = 0;  // where the next read-ahead window starts
  uint64_t limit = 0;     // windows stop here (export or request end)
  uint64_t read_pos = 0;  // how far the scan has read
  uint64_t export_size = 0;
  size_t inflight = 0;     // read-ahead fetches in flight
  uint64_t est_bytes = 0;  // memory one window's answer took, last seen
  std::shared_ptr<const AsyncFetcher> fetcher;
  // Completed windows nobody has read yet, oldest first.
  std::vector<std::pair<uint64_t, uint64_t>> unread;
  // What an upstream answers per call when it answered shorter than asked
  // (a window-limited upstream); 0 = full answers so far.
  uint64_t learned_window = 0;
  // The fetcher and export size of the key's latest detached Get, so a
  // walk seen only through Lookup()+Record() can still read ahead.
  std::shared_ptr<const AsyncFetcher> last_fetcher;
  uint64_t last_export_size = 0;
};

// The whole-map prefetch of one key (its logic lives in read_ahead.h).
struct PrefetchRun {
  bool started = false;   // the key's first detached Get() started it
  bool done = false;      // reached the export end, failed, or gave way to
                          // the memory bound
  uint64_t frontier = 0;  // where the next prefetch window starts
  uint64_t export_size = 0;
  size_t inflight = 0;     // prefetch fetches in flight
  uint64_t est_bytes = 0;  // memory one window's answer took, last seen
  std::shared_ptr<const AsyncFetcher> fetcher;
};

// Everything the cache knows about one (export, context). Shared with the
// completions of its in-flight fetches.
struct KeyState : std::enable_shared_from_this<KeyState> {
  KeyState(CacheKey k, std::atomic<int64_t>* total_mem, int64_t ttl)
      : key(std::move(k)),
        mem(total_mem),
        ttl_ns(ttl),
        map(std::less<uint64_t>(),
            CountingAllocator<std::pair<const uint64_t, Interval>>(&mem)) {}

  // Registers a fetch of [start, end) so later callers wait for it and
  // invalidations poison it.
  FetchPtr RegisterLocked(uint64_t start, uint64_t end, bool read_ahead)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto f = std::make_shared<Fetch>(next_fetch_id++, start, end, read_ahead);
    inflight.push_back(f);
    return f;
  }

  // Constant after construction.
  const CacheKey key;
  // Atomics (no lock).
  MemAccount mem;
  std::atomic<int64_t> ttl_ns;
  Counter hits, partial_hits, misses, upstream_calls, upstream_errors,
      coalesced_waits, detached_waits, read_ahead_issued, read_ahead_hits,
      read_ahead_wasted, bytes_from_cache, bytes_from_upstream, evictions,
      invalidations, stale_fills_dropped, read_ahead_walks, prefetch_issued,
      prefetch_bytes, prefetch_hits, prefetch_completed;
  // Whole-map prefetch policy of the key's export (ExtentCache::
  // SetExportPrefetch); 0 = off, else the fetches kept in flight.
  std::atomic<uint32_t> prefetch_parallel{0};
  // Mirrors "ra has windows in flight or unread" so the hit path checks it
  // without a lock.
  std::atomic<bool> ra_live{false};
  // The walk (read_ahead.h), read and written without the lock by the hit
  // path: the highest end handed out by the current walk, how many reads in
  // a row continued it, and how far read-ahead has covered (0 = no run,
  // kMaxU64 = through the export end).
  std::atomic<uint64_t> walk_end{0};
  std::atomic<uint32_t> walk_streak{0};
  std::atomic<uint64_t> ra_covered{0};
  std::atomic<uint64_t> ra_window_hint{0};

  // Protected by mu.
  mutable sync::Mutex mu;
  // Signalled (all waiters) whenever a fetch of this key completes.
  absl::CondVar fetch_done;
  // Disjoint nonempty intervals; adjacent ones have different flags.
  IntervalMap map ABSL_GUARDED_BY(mu);
  std::vector<FetchPtr> inflight ABSL_GUARDED_BY(mu);
  uint64_t next_fetch_id ABSL_GUARDED_BY(mu) = 1;
  ReadAheadRun ra ABSL_GUARDED_BY(mu);
  PrefetchRun pf ABSL_GUARDED_BY(mu);
  // Learned from this key's answers: how far a write may reach (granule.h).
  GranuleBound granule ABSL_GUARDED_BY(mu);
};

}  // namespace cache_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_KEY_STATE_H_
