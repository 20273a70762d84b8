// server/cache/extent_cache.h — the shared, overlap-aware extent cache.
//
// One ExtentCache instance serves every gRPC call and every NBD shim
// connection. It holds, per CacheKey (export, metadata context), any number
// of disjoint known intervals with their NBD flags in an absl::btree_map
// keyed by start offset (O(log n) lookup; adjacent intervals with equal
// flags are merged). There is one query mode: the cache always asks the
// upstream for full-precision answers without REQ_ONE, so answers never
// differ by mode (see docs/architecture.md).
//
// Contract (tested against a reference model in extent_cache_test.cc):
// * Lookup() never blocks on the upstream; it returns the cached extents
//   contiguous from `offset` and where knowledge stops.
// * Get() answers the cached head and calls the Fetcher only for the gap
//   that follows it, asking for a large window (Options::fetch_window_bytes,
//   clipped to the export end and kMaxNbdRequestLength). The Fetcher's
//   answer may be shorter or longer than asked; it is clipped to the export
//   size and merged. Concurrent Get()s whose gaps overlap an in-flight fetch
//   wait for it (single-flight) instead of calling the upstream again.
// * Invalidate*() removes knowledge; a fetch that was in flight when an
//   overlapping invalidation happened is NOT inserted (epoch check), so a
//   stale hole can never be cached. The caller of Get() still receives the
//   fetched answer (it was true when asked), but later callers do not.
// * Memory is bounded (Options::memory_limit_bytes); least recently used
//   intervals are evicted. Eviction only forgets; it never changes an answer.
// * No lock is held while the Fetcher runs.
//
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_CACHE_EXTENT_CACHE_H_
#define BLOCKMETA_SERVER_CACHE_EXTENT_CACHE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/cache/extent.h"

namespace blockmeta {

struct CacheKey {
  std::string export_name;
  std::string context;  // e.g. "base:allocation", "qemu:dirty-bitmap:b1"

  template <typename H>
  friend H AbslHashValue(H h, const CacheKey& k) {
    return H::combine(std::move(h), k.export_name, k.context);
  }
  friend bool operator==(const CacheKey& a, const CacheKey& b) {
    return a.export_name == b.export_name && a.context == b.context;
  }
};

// Asks the upstream for block status. Must return extents contiguous from
// `offset` (at least one, nonzero lengths) or an error; may cover less or
// more than `length`. Must give up by `deadline` (returning
// DEADLINE_EXCEEDED). Called without any cache lock held.
using Fetcher = absl::FunctionRef<absl::StatusOr<ExtentList>(
    uint64_t offset, uint64_t length, absl::Time deadline)>;

enum class Outcome { kHit, kPartial, kMiss, kBypass };

struct LookupResult {
  // Contiguous extents from the requested offset, clipped to the request.
  ExtentList extents;
  // End of the last extent (== offset when nothing is known).
  uint64_t next_offset = 0;
  Outcome outcome = Outcome::kMiss;
};

struct CacheCounters {
  uint64_t hits = 0;
  uint64_t partial_hits = 0;
  uint64_t misses = 0;
  uint64_t upstream_calls = 0;
  uint64_t coalesced_waits = 0;
  uint64_t bytes_from_cache = 0;
  uint64_t bytes_from_upstream = 0;
  uint64_t evictions = 0;
  uint64_t invalidations = 0;
  uint64_t stale_fills_dropped = 0;
  uint64_t entries = 0;       // gauge
  uint64_t memory_bytes = 0;  // gauge
};

class ExtentCache {
 public:
  struct Options {
    uint64_t memory_limit_bytes = 256ull << 20;
    uint64_t fetch_window_bytes = (4ull << 30) - (1ull << 20);
    absl::Duration ttl = absl::InfiniteDuration();
  };

  explicit ExtentCache(Options options);
  ~ExtentCache();
  ExtentCache(const ExtentCache&) = delete;
  ExtentCache& operator=(const ExtentCache&) = delete;

  // Cached extents contiguous from `offset`, at most `max_extents` of them
  // (0 = unlimited), clipped to [offset, offset + length). Never blocks on
  // the upstream. outcome is kHit when the whole range (or max_extents) was
  // answered, kPartial when only a head was known, kMiss when nothing was.
  // Counts toward the counters only when `count` is true.
  LookupResult Lookup(const CacheKey& key, uint64_t offset, uint64_t length,
                      size_t max_extents, bool count = true);

  // Answers [offset, offset + length) (length is clipped to export_size):
  // the cached head, then — if the head stops before the range end and
  // before max_extents is reached — one fetched (or coalesced) gap. Returns
  // at least one extent unless an error occurs. Blocks the calling thread
  // while the Fetcher (or another caller's fetch it waits for) runs; gives
  // up with DEADLINE_EXCEEDED at `deadline`.
  // Errors: INVALID_ARGUMENT for length 0, OUT_OF_RANGE for offset >=
  // export_size, and whatever the Fetcher returns.
  absl::StatusOr<LookupResult> Get(const CacheKey& key, uint64_t export_size,
                                   uint64_t offset, uint64_t length,
                                   size_t max_extents, Fetcher fetch,
                                   absl::Time deadline);

  // Forgets [offset, offset + length) of one key (length 0 = to the end).
  // Returns what was dropped.
  struct Dropped {
    uint64_t extents = 0;
    uint64_t bytes = 0;
  };
  Dropped Invalidate(const CacheKey& key, uint64_t offset, uint64_t length);
  // Forgets a range of every context of an export (writes go here).
  Dropped InvalidateExportRange(const std::string& export_name,
                                uint64_t offset, uint64_t length);
  // Forgets everything of an export (upstream reconnected), or everything.
  Dropped InvalidateExport(const std::string& export_name);
  Dropped InvalidateAll();

  // Per-export TTL override (absl::InfiniteDuration() = none).
  void SetExportTtl(const std::string& export_name, absl::Duration ttl);

  // Counters summed over every key, or for one key.
  CacheCounters Counters() const;
  CacheCounters Counters(const CacheKey& key) const;
  // Every key that has counters.
  std::vector<CacheKey> Keys() const;

  const Options& options() const { return options_; }

 private:
  class Impl;
  const Options options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_EXTENT_CACHE_H_
