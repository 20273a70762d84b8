// server/cache/extent_cache.h — the shared, overlap-aware extent cache.
//
// One ExtentCache instance serves every gRPC call and every NBD shim
// connection. It holds, per CacheKey (export, metadata context), any number
// of disjoint known intervals with their NBD flags in an absl::btree_map
// keyed by start offset (O(log n) lookup; adjacent intervals with equal
// flags are merged). There is one query mode: the cache always asks the
// upstream for full-precision answers without REQ_ONE, so answers never
// differ by mode (see docs/architecture.md). Keys never mix: two exports,
// or two contexts of one export, never see each other's extents.
//
// Contract (tested against a reference model in
// extent_cache_property_test.cc and under TSan in extent_cache_stress_test):
// * Lookup() never blocks on the upstream; it returns the cached extents
//   contiguous from `offset` and where knowledge stops.
// * Get() answers the cached head and calls the Fetcher only for the gap
//   that follows it, asking for a large window (Options::fetch_window_bytes,
//   but at least to the request end, clipped to the export end and
//   kMaxNbdRequestLength). The Fetcher's answer is validated (contiguous
//   from the gap, nonzero lengths, not empty: else INTERNAL, nothing
//   cached); it may be shorter or longer than asked; it is clipped to the
//   export size and merged, all of it (a longer answer is true too).
//   Concurrent Get()s whose gap starts inside the window of an in-flight
//   fetch of the same key wait for it (single-flight) and take its
//   unpoisoned answer from the fetch record; if that fetch failed or held
//   nothing for their gap they fetch themselves (at most one wait per call).
// * With an AsyncFetcher, waits are detached: a caller's deadline ends its
//   wait, never the fetch, whose answer is cached on completion. The same
//   records schedule read-ahead for scans (Options::read_ahead_windows).
// * Invalidate*() removes knowledge. A fetch that was in flight when an
//   overlapping invalidation happened does NOT insert anything from the
//   first invalidated byte on (per-fetch poison mark), so a stale hole can
//   never be cached; this is counted in stale_fills_dropped. The caller of
//   Get() still receives the fetched answer (it was true when asked), but
//   later callers do not.
// * TTL: an interval older than the export's TTL is unknown (as if absent).
// * Memory is bounded (Options::memory_limit_bytes, counting the bytes the
//   interval maps allocate). When a fill pushes the total over the limit,
//   the least recently used intervals of all keys are evicted down to 7/8
//   of the limit. Eviction only forgets; it never changes an answer.
// * No lock is held while the Fetcher runs. Completions may outlive the
//   ExtentCache object: they keep its state alive until they have run.
//
// Cost: Lookup is one hash lookup + one btree descent under reader locks,
// O(log n + extents returned); measured ~0.15 µs at 1k and ~0.35 µs at 1M
// extents (random offsets; see docs/benchmarks.md). Each cached interval
// is a 32-byte btree slot, 35-45 bytes with node overhead (36-47 bytes of
// malloc'd heap). Eviction is a coarse LRU: a global
// logical clock advances once per fill and readers stamp intervals with a
// relaxed atomic store; an eviction pass samples ages and erases the oldest
// fraction, O(n) per pass but amortized over 1/8 of the limit of fills.
//
// Thread-safety: all methods are thread-safe. Lookups of a key take its
// lock shared; fills and invalidations take it exclusively and briefly.
// Keys are created on first use and live until RemoveExport(name) frees
// every key of that export with its counters (the server calls it once a
// removed export has drained): callers must pass only configured exports
// and negotiated contexts.
#ifndef BLOCKMETA_SERVER_CACHE_EXTENT_CACHE_H_
#define BLOCKMETA_SERVER_CACHE_EXTENT_CACHE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/cache/cache_key.h"
#include "server/cache/extent.h"
#include "server/cache/fetcher.h"

namespace blockmeta {

// kHit: answered from the cache alone. kPartial: a cached head, then the
// upstream (own call or a coalesced one). kMiss: nothing cached at offset.
// kBypass is never produced by the cache (the service uses it).
enum class Outcome { kHit, kPartial, kMiss, kBypass };

struct LookupResult {
  // Contiguous extents from the requested offset, clipped to the request;
  // adjacent extents have different flags.
  ExtentList extents;
  // End of the last extent (== offset when nothing is known).
  uint64_t next_offset = 0;
  Outcome outcome = Outcome::kMiss;
};

struct CacheCounters {
  uint64_t hits = 0;  // Record()/Get calls by Outcome
  uint64_t partial_hits = 0;
  uint64_t misses = 0;
  // Every upstream block-status call made for this key: the cache's own
  // fetches (demand and read-ahead) and those reported by RecordUpstreamCall
  // (cache-bypassing calls), so per-export and total figures agree.
  uint64_t upstream_calls = 0;
  uint64_t upstream_errors = 0;  // of those, the ones that failed
  uint64_t coalesced_waits = 0;  // Get()s that waited for another's fetch
  // Get()s that gave up at their deadline while the fetch ran on (its
  // answer is still cached).
  uint64_t detached_waits = 0;
  uint64_t read_ahead_issued = 0;  // read-ahead fetches issued
  // Read-ahead windows a later Get() read (waited for or found cached).
  uint64_t read_ahead_hits = 0;
  // Read-ahead windows nobody read: failed, cut by an invalidation, or
  // left unread when the scan moved elsewhere.
  uint64_t read_ahead_wasted = 0;
  uint64_t bytes_from_cache = 0;
  uint64_t bytes_from_upstream = 0;  // bytes returned from own fetches
  uint64_t evictions = 0;            // intervals evicted (LRU or TTL)
  uint64_t invalidations = 0;        // Invalidate* calls, per key touched
  uint64_t stale_fills_dropped = 0;  // fills cut by an in-flight invalidation
  uint64_t entries = 0;              // gauge: intervals held
  uint64_t memory_bytes = 0;         // gauge: bytes the interval maps hold
  // Read-ahead runs started by a walk detected by position.
  uint64_t read_ahead_walks = 0;
  // Whole-map prefetch: fetches issued, bytes of map they brought, Get()s
  // that waited for a prefetch fetch in flight (served when it arrived),
  // prefetches that reached the export end, and fetches in flight (gauge).
  uint64_t prefetch_issued = 0;
  uint64_t prefetch_bytes = 0;
  uint64_t prefetch_hits = 0;
  uint64_t prefetch_completed = 0;
  uint64_t prefetch_inflight = 0;

  CacheCounters& operator+=(const CacheCounters& o) {
    hits += o.hits;
    partial_hits += o.partial_hits;
    misses += o.misses;
    upstream_calls += o.upstream_calls;
    upstream_errors += o.upstream_errors;
    coalesced_waits += o.coalesced_waits;
    detached_waits += o.detached_waits;
    read_ahead_issued += o.read_ahead_issued;
    read_ahead_hits += o.read_ahead_hits;
    read_ahead_wasted += o.read_ahead_wasted;
    bytes_from_cache += o.bytes_from_cache;
    bytes_from_upstream += o.bytes_from_upstream;
    evictions += o.evictions;
    invalidations += o.invalidations;
    stale_fills_dropped += o.stale_fills_dropped;
    entries += o.entries;
    memory_bytes += o.memory_bytes;
    read_ahead_walks += o.read_ahead_walks;
    prefetch_issued += o.prefetch_issued;
    prefetch_bytes += o.prefetch_bytes;
    prefetch_hits += o.prefetch_hits;
    prefetch_completed += o.prefetch_completed;
    prefetch_inflight += o.prefetch_inflight;
    return *this;
  }
};

// Upper bound of Options::read_ahead_windows (fetches in flight per key).
inline constexpr uint32_t kMaxReadAheadWindows = 64;

class ExtentCache {
 public:
  struct Options {
    // Bound on the bytes of all interval maps together.
    uint64_t memory_limit_bytes = 256ull << 20;
    // How much a miss asks the upstream for, from the gap start.
    uint64_t fetch_window_bytes = (4ull << 30) - (1ull << 20);
    // Read-ahead: how many windows a sequential scan keeps in flight ahead
    // of itself (0 = none; more than kMaxReadAheadWindows counts as that).
    // See Get().
    uint32_t read_ahead_windows = 8;
    // Default TTL of cached intervals; InfiniteDuration() = never expire.
    absl::Duration ttl = absl::InfiniteDuration();
    // Clock for TTL only (tests inject a fake one); empty = absl::Now.
    // Deadlines always use absl::Now.
    std::function<absl::Time()> clock;
  };

  explicit ExtentCache(Options options);
  ~ExtentCache();
  ExtentCache(const ExtentCache&) = delete;
  ExtentCache& operator=(const ExtentCache&) = delete;

  // Cached extents contiguous from `offset`, at most `max_extents` of them
  // (0 = unlimited), clipped to [offset, offset + length). Never blocks on
  // the upstream, never counts and never creates a key. outcome is kHit
  // when the whole range (or max_extents) was answered, kPartial when only
  // a head was known, kMiss when nothing was (or length is 0).
  LookupResult Lookup(const CacheKey& key, uint64_t offset, uint64_t length,
                      size_t max_extents) const;
  // Counts a Lookup() result the caller answered with (its outcome and the
  // bytes from the cache), as Get() counts its own. A walk answered from
  // the cache (the shim's warm REQ_ONE steps) is followed from here: it
  // counts read-ahead hits and keeps read-ahead ahead of it, issuing
  // windows through the fetcher of the key's last detached Get().
  void Record(const CacheKey& key, uint64_t offset, const LookupResult& r);
  // Counts an upstream block-status call made outside the cache (a
  // bypassing caller), so upstream_calls covers every call.
  void RecordUpstreamCall(const CacheKey& key, const absl::Status& status);

  // Answers [offset, offset + length) (length is clipped to export_size):
  // the cached head, then — if the head stops before the range end and
  // before max_extents is reached — one fetched (or coalesced) gap. Returns
  // at least one extent unless an error occurs; may stop early (the fetch
  // answered short), see next_offset.
  //
  // With an AsyncFetcher the fetch is detached from the caller: the caller
  // waits for it until `deadline` only and then gets DEADLINE_EXCEEDED,
  // while the fetch runs on, and its answer is validated, poison-trimmed
  // and cached on completion for the next caller (single-flight holds: a
  // later Get() of the same gap waits for the same fetch). The same
  // in-flight records schedule read-ahead, at most
  // Options::read_ahead_windows fetches per key beyond the demand one:
  // * walks, detected by position (read_ahead.h): reads that continue the
  //   highest offset handed out, twice in a row or with a request of at
  //   least a quarter window (REQ_ONE clients); windows to the export end,
  //   followed through Get() and Lookup()+Record() alike;
  // * window-limited scans: when the gap starts in the last window of a
  //   run whose last answer was shorter than asked (length L), fetches of
  //   L bytes at the run end, end + L, ... ;
  // * long requests (a MapExtents of a large disk): when the request goes
  //   beyond the demand window W, fetches of W bytes at gap + W, ... ;
  // clipped to the export end (and to the request end for long requests),
  // kept going as the scan reads them, and bounded by what the memory bound
  // can hold. Every in-flight fetch obeys the poison rule.
  //
  // Memory pressure: a fill inserts the part of its answer nearest its
  // start, at most half the memory bound (shared among the key's in-flight
  // read-ahead); the caller still gets the whole answer. Waiters read the
  // answer from the fetch record, never from a cache that may have evicted
  // it.
  //
  // Errors: INVALID_ARGUMENT for length 0, OUT_OF_RANGE for offset >=
  // export_size, DEADLINE_EXCEEDED, INTERNAL for a malformed Fetcher answer,
  // and whatever the Fetcher returns (propagated even after a cached head).
  absl::StatusOr<LookupResult> Get(const CacheKey& key, uint64_t export_size,
                                   uint64_t offset, uint64_t length,
                                   size_t max_extents,
                                   const AsyncFetcher& fetch,
                                   absl::Time deadline);
  // The same with a synchronous fetcher: it runs on the calling thread
  // until it returns (no detaching, no read-ahead).
  absl::StatusOr<LookupResult> Get(const CacheKey& key, uint64_t export_size,
                                   uint64_t offset, uint64_t length,
                                   size_t max_extents, Fetcher fetch,
                                   absl::Time deadline);

  // Forgets [offset, offset + length) of one key (length 0 = to the end).
  // Returns what was dropped. Fetches of the key in flight are cut at the
  // range. Keys never used are not created.
  struct Dropped {
    uint64_t extents = 0;  // pieces cut from larger intervals count as one
    uint64_t bytes = 0;
  };
  Dropped Invalidate(const CacheKey& key, uint64_t offset, uint64_t length);
  // A write, trim or zero of [offset, offset + length) (length 0 = to the
  // end): forgets, in every context of the export, what it may have
  // changed: the range rounded out, per context, to the granule bound
  // learned from that context's answers (server/cache/granule.h: the gcd of
  // the offsets where an answer's flags change, a multiple of the
  // upstream's granularity); a context that has shown no such boundary
  // since its last reset is forgotten whole. Callers round to their own
  // floor first (the NBD shim: ExportInvalidateGranularity).
  Dropped InvalidateExportRange(const std::string& export_name, uint64_t offset,
                                uint64_t length);
  // Forgets everything of an export (upstream reconnected), or everything;
  // this (and Invalidate of a whole key) also resets the learned granule
  // bounds.
  Dropped InvalidateExport(const std::string& export_name);
  Dropped InvalidateAll();

  // Per-export TTL override, replacing Options::ttl for that export's keys
  // (absl::InfiniteDuration() = that export's intervals never expire).
  void SetExportTtl(const std::string& export_name, absl::Duration ttl);

  // Whole-map prefetch of an export: with `parallel` > 0, the first
  // detached Get() of each of its keys (contexts) starts a background map of
  // the whole export, `parallel` fetches in flight (fewer while callers'
  // own fetches of the key are in flight: it yields to them). Callers are
  // served as soon as their range arrives (they wait for the prefetch fetch
  // that covers them, single-flight). Every prefetch fetch obeys the poison
  // rule and the memory bound (the prefetch ends when memory nears the
  // bound). 0 (the default) = off. Applies to keys made later and to keys
  // that have not started one yet.
  void SetExportPrefetch(const std::string& export_name, uint32_t parallel);
  // The export's prefetch parallelism (0 = off).
  uint32_t ExportPrefetch(const std::string& export_name) const;

  // Counters summed over every key, or for one key (zeros if unknown).
  CacheCounters Counters() const;
  CacheCounters Counters(const CacheKey& key) const;
  // Every key that has counters.
  std::vector<CacheKey> Keys() const;

  const Options& options() const { return options_; }

  // Forgets an export that was removed: its intervals (memory comes back at
  // once), its TTL override, and its keys with their counters (Keys() and
  // Counters() no longer include them; a key made again later starts at
  // zero). Call only when no call of that export is in flight: a fetch
  // still running is poisoned, but a later Get would create a new key.
  // Each removed key leaves a small record (~300 bytes) that is never
  // freed, since lock-free readers may hold pointers to it.
  Dropped RemoveExport(const std::string& export_name);

 private:
  class Impl;
  const Options options_;
  // Shared with in-flight fetch completions, which may outlive the cache.
  std::shared_ptr<Impl> impl_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_EXTENT_CACHE_H_
