// server/cache/extent_cache.cc — ExtentCache: per-key interval maps,
// single-flight fills with poison marks, coarse-LRU eviction.
//
// Layout. keys_ (under keys_mu_) maps a CacheKey to a KeyState that lives as
// long as the cache (pointers to it stay valid without keys_mu_). Each
// KeyState has its own mutex guarding its interval map and its list of
// in-flight fetches; counters and memory accounting are relaxed atomics.
//
// Lock order: evict_mu_ -> keys_mu_ -> KeyState::mu. keys_mu_ is never held
// while a KeyState::mu is taken, and no lock is held across the Fetcher.
#include "server/cache/extent_cache.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/cache/granule.h"
#include "server/common/mutex.h"

namespace blockmeta {
namespace {

constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();
constexpr int64_t kNoTtl = std::numeric_limits<int64_t>::max();
// Intervals visited per lock hold by eviction passes, so lookups and fills
// of a big key are not stalled for a whole pass.
constexpr size_t kSweepChunk = 1024;
// Ages sampled per eviction pass to choose the cutoff.
constexpr size_t kMaxSamples = 1 << 16;

// Bytes allocated by one key's interval map; the total over all keys is
// what the memory limit bounds.
struct MemAccount {
  explicit MemAccount(std::atomic<int64_t>* t) : total(t) {}
  void Add(int64_t n) {
    bytes.fetch_add(n, std::memory_order_relaxed);
    total->fetch_add(n, std::memory_order_relaxed);
  }
  std::atomic<int64_t> bytes{0};
  std::atomic<int64_t>* const total;
};

// std::allocator that charges a MemAccount: memory_bytes is exact for the
// btree nodes (malloc's own per-chunk overhead excluded).
template <typename T>
class CountingAllocator {
 public:
  using value_type = T;
  explicit CountingAllocator(MemAccount* account) : account_(account) {}
  template <typename U>
  CountingAllocator(const CountingAllocator<U>& other)  // NOLINT: rebinding
      : account_(other.account()) {}
  T* allocate(size_t n) {
    T* p = std::allocator<T>().allocate(n);
    account_->Add(static_cast<int64_t>(n * sizeof(T)));
    return p;
  }
  void deallocate(T* p, size_t n) {
    std::allocator<T>().deallocate(p, n);
    account_->Add(-static_cast<int64_t>(n * sizeof(T)));
  }
  MemAccount* account() const { return account_; }
  template <typename U>
  bool operator==(const CountingAllocator<U>& o) const {
    return account_ == o.account();
  }
  template <typename U>
  bool operator!=(const CountingAllocator<U>& o) const {
    return account_ != o.account();
  }

 private:
  MemAccount* account_;
};

// LRU stamp. Readers touch it under a shared lock, so it is atomic; the
// copy operations (used by the btree when it moves slots, under the
// exclusive lock) load relaxed.
class LruTick {
 public:
  explicit LruTick(uint32_t v = 0) : v_(v) {}
  LruTick(const LruTick& o) : v_(o.Get()) {}
  LruTick& operator=(const LruTick& o) {
    v_.store(o.Get(), std::memory_order_relaxed);
    return *this;
  }
  uint32_t Get() const { return v_.load(std::memory_order_relaxed); }
  // Stores only when it changes, so hot intervals do not bounce cache lines.
  void Touch(uint32_t now) {
    if (Get() != now) v_.store(now, std::memory_order_relaxed);
  }

 private:
  std::atomic<uint32_t> v_;
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

// Age of a stamp relative to the clock; stamps newer than `now` (touched
// after the clock was read) are age 0. Wrap-safe for ages below 2^31 fills.
uint32_t Age(uint32_t now, uint32_t tick) {
  const uint32_t d = now - tick;
  return static_cast<int32_t>(d) < 0 ? 0 : d;
}

bool Expired(const Interval& iv, int64_t now_ns, int64_t ttl_ns) {
  return ttl_ns != kNoTtl && now_ns - iv.born_ns >= ttl_ns;
}

int64_t TtlNs(absl::Duration ttl) {
  if (ttl == absl::InfiniteDuration()) return kNoTtl;
  return std::max<int64_t>(0, absl::ToInt64Nanoseconds(ttl));
}

uint64_t SatAdd(uint64_t a, uint64_t b) {
  return b > kMaxU64 - a ? kMaxU64 : a + b;
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

// Memory one cached interval takes, for planning (a 32-byte btree slot plus
// node overhead; see the header's Cost paragraph).
constexpr uint64_t kIntervalBytes = 48;

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
  const bool read_ahead;
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
};

// Appends e to out, merging it into the last extent when contiguous with
// equal flags.
void AppendMerged(ExtentList* out, const Extent& e) {
  if (!out->empty() && out->back().end() == e.offset &&
      out->back().flags == e.flags) {
    out->back().length += e.length;
  } else {
    out->push_back(e);
  }
}

bool CanAppend(const ExtentList& out, size_t max_extents, uint64_t offset,
               uint32_t flags) {
  if (max_extents == 0 || out.size() < max_extents) return true;
  return !out.empty() && out.back().end() == offset &&
         out.back().flags == flags;
}

}  // namespace

// Everything the cache knows about one (export, context). Shared with the
// completions of its in-flight fetches.
struct KeyState : std::enable_shared_from_this<KeyState> {
  KeyState(CacheKey k, std::atomic<int64_t>* total_mem, int64_t ttl)
      : key(std::move(k)),
        mem(total_mem),
        ttl_ns(ttl),
        map(std::less<uint64_t>(),
            CountingAllocator<std::pair<const uint64_t, Interval>>(&mem)) {}

  // Constant after construction.
  const CacheKey key;
  // Atomics (no lock).
  MemAccount mem;
  std::atomic<int64_t> ttl_ns;
  Counter hits, partial_hits, misses, upstream_calls, upstream_errors,
      coalesced_waits, detached_waits, read_ahead_issued, read_ahead_hits,
      read_ahead_wasted, bytes_from_cache, bytes_from_upstream, evictions,
      invalidations, stale_fills_dropped;
  // Mirrors "ra has a live run" so the hit path checks it without a lock.
  std::atomic<bool> ra_live{false};

  // Protected by mu.
  mutable sync::Mutex mu;
  // Signalled (all waiters) whenever a fetch of this key completes.
  absl::CondVar fetch_done;
  // Disjoint nonempty intervals; adjacent ones have different flags.
  IntervalMap map ABSL_GUARDED_BY(mu);
  std::vector<FetchPtr> inflight ABSL_GUARDED_BY(mu);
  uint64_t next_fetch_id ABSL_GUARDED_BY(mu) = 1;
  ReadAheadRun ra ABSL_GUARDED_BY(mu);
  // Learned from this key's answers: how far a write may reach (granule.h).
  GranuleBound granule ABSL_GUARDED_BY(mu);
};

class ExtentCache::Impl : public std::enable_shared_from_this<Impl> {
 public:
  explicit Impl(const Options& options) : options_(Clamped(options)) {}

  LookupResult Lookup(const CacheKey& key, uint64_t offset, uint64_t length,
                      size_t max_extents) const;
  void Record(const CacheKey& key, uint64_t offset, const LookupResult& r);
  void RecordUpstreamCall(const CacheKey& key, const absl::Status& status);
  // Exactly one of `async` and `sync` is set. With `async` the call is
  // detached: the fetcher may be called after Get() returns (read-ahead,
  // detached waits). With `sync` the call's own fetch runs inline and
  // completes under the lock that hands the answer to the caller.
  absl::StatusOr<LookupResult> Get(
      const CacheKey& key, uint64_t export_size, uint64_t offset,
      uint64_t length, size_t max_extents,
      const std::shared_ptr<const AsyncFetcher>& async, const Fetcher* sync,
      absl::Time deadline);
  // A write (`write`): per key, the range rounded out to its granule
  // bound. Else a whole-key invalidation also resets the bound.
  Dropped InvalidateKeys(const std::vector<KeyState*>& keys, uint64_t offset,
                         uint64_t length, bool write = false);
  void SetExportTtl(const std::string& export_name, absl::Duration ttl);
  static CacheCounters CountersOf(const KeyState& k);

  KeyState* Find(const CacheKey& key) const;
  KeyState* FindOrCreate(const CacheKey& key);
  // Keys of one export, or all keys when export_name is null.
  std::vector<KeyState*> KeysOf(const std::string* export_name) const;

 private:
  static Options Clamped(Options o) {
    o.read_ahead_windows = std::min(o.read_ahead_windows, kMaxReadAheadWindows);
    return o;
  }
  // Where one Get() stands.
  struct Progress {
    LookupResult r;
    uint64_t offset = 0;  // the request: [offset, end), end clipped to
    uint64_t end = 0;     // the export
    uint64_t export_size = 0;
    size_t max_extents = 0;
    bool upstream = false;       // waited for or made a fetch
    uint64_t head_bytes = 0;     // cached bytes before the first fetch/wait
    uint64_t fetched_bytes = 0;  // bytes from this call's own fetch
    bool Done() const {
      return r.next_offset >= end ||
             (max_extents != 0 && r.extents.size() >= max_extents);
    }
  };

  int64_t NowNs() const {
    return absl::ToUnixNanos(options_.clock ? options_.clock() : absl::Now());
  }
  // Appends the known extents contiguous from `from` (clipped to `to`,
  // within max_extents) to *out; returns where knowledge stops.
  uint64_t ReadLocked(const KeyState& k, uint64_t from, uint64_t to,
                      size_t max_extents, ExtentList* out) const
      ABSL_SHARED_LOCKS_REQUIRED(k.mu);
  // Forgets [a, b) (in-flight fetches are poisoned by the caller).
  static Dropped RemoveRangeLocked(KeyState& k, uint64_t a, uint64_t b)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Inserts a validated answer contiguous from its first offset, whose
  // range has been cleared, merging with equal-flag neighbours.
  void InsertLocked(KeyState& k, absl::Span<const Extent> answer,
                    int64_t born_ns, uint32_t tick)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);

  // --- The steps of Get() ---
  // Get() = ReadHead; unless that answered, Round(may_join) (wait for the
  // fetch in flight that covers the gap: single-flight); if that brought
  // nothing for the gap, Round(!may_join) (a fetch of our own); Finish.
  // At most one wait and one fetch of our own per call, in practice.
  enum class Next { kAnswered, kAgain };
  // What a round reads: the gap it starts at and the fetch that answers it
  // (null f: fills that landed meanwhile answered the call).
  struct Claim {
    FetchPtr f;
    bool own = false;  // we registered f (else another caller did)
    uint64_t gap = 0;
  };
  // Step 1: the cached head, under the shared lock.
  void ReadHead(const KeyState& k, Progress* p) const;
  // One round: ClaimLocked, then the fetcher (Issue, or FetchInline for a
  // synchronous one), then CollectLocked. kAgain: the claimed fetch failed
  // or held nothing for the gap (another caller's: it may be poisoned).
  absl::StatusOr<Next> Round(KeyState& k, Progress* p, bool may_join,
                             const std::shared_ptr<const AsyncFetcher>& async,
                             const Fetcher* sync, absl::Time deadline);
  // Under one hold: re-reads what fills landed since the last read, then
  // claims the in-flight fetch whose window holds the gap (when may_join,
  // steps 2), else registers one of our own (step 3, planning read-ahead
  // when detached). Records to issue go to *issue.
  absl::StatusOr<Claim> ClaimLocked(
      KeyState& k, Progress* p, bool may_join,
      const std::shared_ptr<const AsyncFetcher>& async, absl::Time deadline,
      std::vector<FetchPtr>* issue) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Waits for the claimed fetch (step 5: the deadline ends the wait, never
  // the fetch) and appends its answer (step 7); tops read-ahead up when
  // detached.
  absl::StatusOr<Next> CollectLocked(KeyState& k, const Claim& c, Progress* p,
                                     bool detached, absl::Time deadline,
                                     std::vector<FetchPtr>* issue)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // The error of a caller whose deadline ended its wait (counted).
  static absl::Status DetachedLocked(KeyState& k, uint64_t gap)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // The outcome, counted (step 8); INTERNAL when nothing was answered.
  static absl::StatusOr<LookupResult> Finish(KeyState& k, Progress* p);
  // Step 2: the in-flight fetch whose window holds `gap` (the latest
  // started), or null.
  static FetchPtr FindCoverLocked(const KeyState& k, uint64_t gap)
      ABSL_SHARED_LOCKS_REQUIRED(k.mu);
  // Step 3: registers a fetch of [start, end) so later callers wait for it
  // and invalidations poison it.
  static FetchPtr RegisterLocked(KeyState& k, uint64_t start, uint64_t end,
                                 bool read_ahead)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Step 4: calls the fetcher for each record, with no lock held.
  void Issue(KeyState& k, std::vector<FetchPtr> fetches,
             const std::shared_ptr<const AsyncFetcher>& fetcher,
             uint64_t export_size);
  // Step 5: waits until `f` completed or the deadline passed.
  static bool AwaitLocked(KeyState& k, const Fetch& f, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Step 6 (on the completion's thread): validates, poison-trims, inserts
  // what the memory bound allows, keeps read-ahead going, evicts, and then
  // marks the fetch done and wakes its waiters.
  void OnFetchDone(KeyState& k, const FetchPtr& f,
                   absl::StatusOr<ExtentList> answer, uint64_t export_size,
                   int64_t born_ns);
  // Step 6, synchronous fetcher: calls it for the caller's own record `f`
  // and completes it, appending its answer to *p under the same lock.
  // Returns the fetch's error, or whether it held anything for `gap`.
  absl::StatusOr<bool> FetchInline(KeyState& k, const FetchPtr& f,
                                   const Fetcher& fetch, uint64_t gap,
                                   uint64_t export_size, absl::Time deadline,
                                   Progress* p);
  // The upstream answer checked and clipped (errors counted).
  static absl::Status CheckAnswer(KeyState& k, uint64_t start,
                                  uint64_t export_size,
                                  absl::StatusOr<ExtentList> answer,
                                  ExtentList* out);
  void CompleteLocked(KeyState& k, Fetch& f, absl::Status status,
                      ExtentList answer, uint64_t export_size, int64_t born_ns,
                      std::vector<FetchPtr>* issue)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Marks f done and wakes its waiters, in the same hold when the memory
  // bound holds; else it releases k.mu to evict first (so no waiter sees
  // the bound exceeded) and takes it again.
  void ReleaseLocked(KeyState& k, Fetch& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Step 7: appends f's answer from `gap` to the caller's result: all of it
  // for the caller that registered it, the unpoisoned part for others.
  // Returns false when it holds nothing for `gap`.
  static bool AppendAnswer(const Fetch& f, bool own, uint64_t gap, Progress* p);
  // Step 8: counts the call by outcome (the one outcome-to-counter map).
  static void CountOutcome(KeyState& k, Outcome outcome, uint64_t cached,
                           uint64_t fetched);

  // --- Read-ahead ---
  // Starts (or continues) a run when the gap is in the last window of a
  // short-answered run, or the request reaches beyond the demand window.
  void PlanReadAheadLocked(KeyState& k, uint64_t gap, uint64_t demand_end,
                           uint64_t request_end, uint64_t export_size,
                           const std::shared_ptr<const AsyncFetcher>& fetcher,
                           std::vector<FetchPtr>* issue)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Issues windows at the frontier while fewer than the allowed number are
  // in flight and the scan is close enough.
  void TopUpLocked(KeyState& k, std::vector<FetchPtr>* issue)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // The scan read [from, to): counts read-ahead hits, advances read_pos.
  static void NoteReadLocked(KeyState& k, uint64_t from, uint64_t to)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Ends a run: its unread windows are wasted.
  static void EndRunLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  static void UpdateLiveLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // A hit of a key with a live run: note it and top up (takes the lock).
  void NoteHit(KeyState& k, uint64_t from, uint64_t to);
  // Memory one fill may insert: half the bound, shared with the key's
  // read-ahead windows in flight.
  uint64_t FillBudgetLocked(const KeyState& k) const
      ABSL_SHARED_LOCKS_REQUIRED(k.mu);

  int64_t MemoryLimit() const {
    return static_cast<int64_t>(std::min<uint64_t>(
        options_.memory_limit_bytes, std::numeric_limits<int64_t>::max()));
  }
  void MaybeEvict();
  uint64_t EvictPass(const std::vector<KeyState*>& keys, uint32_t now,
                     uint32_t cutoff_age);

  const Options options_;
  std::atomic<int64_t> total_mem_{0};
  // LRU clock: advances once per fill.
  std::atomic<uint32_t> lru_clock_{1};

  // Serializes eviction passes (taken before keys_mu_ and KeyState::mu).
  sync::Mutex evict_mu_ ABSL_ACQUIRED_BEFORE(keys_mu_);
  mutable sync::Mutex keys_mu_;
  absl::flat_hash_map<CacheKey, std::shared_ptr<KeyState>> keys_
      ABSL_GUARDED_BY(keys_mu_);
  absl::flat_hash_map<std::string, absl::Duration> export_ttl_
      ABSL_GUARDED_BY(keys_mu_);
  // Keys of removed exports (ExtentCache::RemoveExport): out of keys_, maps
  // emptied, kept because KeyState pointers must stay valid.
  std::vector<std::shared_ptr<KeyState>> retired_ ABSL_GUARDED_BY(keys_mu_);
  friend class ExtentCache;  // RemoveExport, at the end of this file
};

KeyState* ExtentCache::Impl::Find(const CacheKey& key) const {
  sync::ReaderMutexLock l(&keys_mu_);
  auto it = keys_.find(key);
  return it == keys_.end() ? nullptr : it->second.get();
}

KeyState* ExtentCache::Impl::FindOrCreate(const CacheKey& key) {
  if (KeyState* k = Find(key)) return k;
  sync::MutexLock l(&keys_mu_);
  std::shared_ptr<KeyState>& slot = keys_[key];
  if (slot == nullptr) {
    auto ttl = export_ttl_.find(key.export_name);
    slot = std::make_shared<KeyState>(
        key, &total_mem_,
        TtlNs(ttl == export_ttl_.end() ? options_.ttl : ttl->second));
  }
  return slot.get();
}

std::vector<KeyState*> ExtentCache::Impl::KeysOf(
    const std::string* export_name) const {
  std::vector<KeyState*> out;
  sync::ReaderMutexLock l(&keys_mu_);
  for (const auto& [key, state] : keys_) {
    if (export_name == nullptr || key.export_name == *export_name) {
      out.push_back(state.get());
    }
  }
  return out;
}

void ExtentCache::Impl::SetExportTtl(const std::string& export_name,
                                     absl::Duration ttl) {
  sync::MutexLock l(&keys_mu_);
  export_ttl_[export_name] = ttl;
  for (const auto& [key, state] : keys_) {
    if (key.export_name == export_name) state->ttl_ns.store(TtlNs(ttl));
  }
}

uint64_t ExtentCache::Impl::ReadLocked(const KeyState& k, uint64_t from,
                                       uint64_t to, size_t max_extents,
                                       ExtentList* out) const {
  if (from >= to) return from;
  auto it = k.map.upper_bound(from);
  if (it == k.map.begin()) return from;
  --it;
  const int64_t ttl = k.ttl_ns.load(std::memory_order_relaxed);
  const int64_t now_ns = ttl == kNoTtl ? 0 : NowNs();
  const uint32_t tick = lru_clock_.load(std::memory_order_relaxed);
  uint64_t pos = from;
  while (pos < to && it != k.map.end() && it->first <= pos &&
         it->second.end > pos) {
    const Interval& iv = it->second;
    if (Expired(iv, now_ns, ttl) ||
        !CanAppend(*out, max_extents, pos, iv.flags)) {
      break;
    }
    const uint64_t e = std::min(iv.end, to);
    AppendMerged(out, Extent{pos, e - pos, iv.flags});
    iv.tick.Touch(tick);
    pos = e;
    ++it;
  }
  return pos;
}

ExtentCache::Dropped ExtentCache::Impl::RemoveRangeLocked(KeyState& k,
                                                          uint64_t a,
                                                          uint64_t b) {
  Dropped d;
  if (a >= b) return d;
  IntervalMap& m = k.map;
  auto it = m.upper_bound(a);
  if (it != m.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end > a) {
      ++d.extents;
      const uint64_t pe = prev->second.end;
      if (prev->first < a) {
        prev->second.end = a;  // keep [prev.start, a)
        if (pe > b) {          // and [b, pe)
          Interval tail = prev->second;
          tail.end = pe;
          m.emplace_hint(it, b, tail);
          d.bytes += b - a;
          return d;
        }
        d.bytes += pe - a;
      } else {  // prev starts at a
        if (pe > b) {
          Interval tail = prev->second;
          m.erase(prev);
          m.emplace(b, tail);
          d.bytes += b - a;
          return d;
        }
        d.bytes += pe - a;
        it = m.erase(prev);
      }
    }
  }
  while (it != m.end() && it->first < b) {
    ++d.extents;
    if (it->second.end > b) {
      Interval tail = it->second;
      d.bytes += b - it->first;
      m.erase(it);
      m.emplace(b, tail);
      break;
    }
    d.bytes += it->second.end - it->first;
    it = m.erase(it);
  }
  return d;
}

void ExtentCache::Impl::InsertLocked(KeyState& k,
                                     absl::Span<const Extent> answer,
                                     int64_t born_ns, uint32_t tick) {
  if (answer.empty()) return;
  IntervalMap& m = k.map;
  const int64_t ttl = k.ttl_ns.load(std::memory_order_relaxed);
  const int64_t now_ns = ttl == kNoTtl ? 0 : NowNs();
  const uint64_t start = answer.front().offset;
  auto hint = m.lower_bound(start);  // first interval after the hole
  // Only `hint` (the interval after the last one placed) stays live across
  // the loop; the last run is prev(hint) for the right-hand merge. (Keeping
  // its iterator too made GCC spill both through SSE registers with
  // store-forwarding stalls on every insert.)
  bool first = true;
  for (size_t i = 0; i < answer.size();) {
    // One run of equal flags.
    const uint32_t flags = answer[i].flags;
    const uint64_t run_start = answer[i].offset;
    uint64_t run_end = answer[i].end();
    for (++i; i < answer.size() && answer[i].flags == flags; ++i) {
      run_end = answer[i].end();
    }
    if (first && hint != m.begin()) {
      // First run: merge into the left neighbour if it touches us.
      auto prev = std::prev(hint);
      if (prev->second.end == run_start && prev->second.flags == flags) {
        if (Expired(prev->second, now_ns, ttl)) {
          m.erase(prev);
          k.evictions.Add(1);
          hint = m.lower_bound(start);
        } else {
          prev->second.end = run_end;
          prev->second.born_ns = std::min(prev->second.born_ns, born_ns);
          prev->second.tick = LruTick(tick);
          hint = std::next(prev);
          first = false;
          continue;
        }
      }
    }
    hint = std::next(m.emplace_hint(
        hint, run_start, Interval{run_end, born_ns, flags, LruTick(tick)}));
    first = false;
  }
  // Merge the right neighbour into the last run if it touches it.
  if (hint == m.end()) return;
  auto last = std::prev(hint);
  if (hint->first != last->second.end ||
      hint->second.flags != last->second.flags) {
    return;
  }
  if (!Expired(hint->second, now_ns, ttl)) {
    last->second.end = hint->second.end;
    last->second.born_ns = std::min(last->second.born_ns, hint->second.born_ns);
  } else {
    k.evictions.Add(1);
  }
  m.erase(hint);
}

LookupResult ExtentCache::Impl::Lookup(const CacheKey& key, uint64_t offset,
                                       uint64_t length,
                                       size_t max_extents) const {
  LookupResult r;
  r.next_offset = offset;
  r.outcome = Outcome::kMiss;
  KeyState* k = Find(key);
  if (k == nullptr || length == 0) return r;
  const uint64_t end = SatAdd(offset, length);
  {
    sync::ReaderMutexLock l(&k->mu);
    r.next_offset = ReadLocked(*k, offset, end, max_extents, &r.extents);
  }
  if (r.next_offset == end) {
    r.outcome = Outcome::kHit;
  } else if (!r.extents.empty()) {
    r.outcome = max_extents != 0 && r.extents.size() >= max_extents
                    ? Outcome::kHit
                    : Outcome::kPartial;
  }
  return r;
}

void ExtentCache::Impl::Record(const CacheKey& key, uint64_t offset,
                               const LookupResult& r) {
  KeyState* k = FindOrCreate(key);
  CountOutcome(*k, r.outcome, r.next_offset - offset, 0);
  if (k->ra_live.load(std::memory_order_relaxed)) {
    NoteHit(*k, offset, r.next_offset);
  }
}

void ExtentCache::Impl::RecordUpstreamCall(const CacheKey& key,
                                           const absl::Status& status) {
  KeyState* k = FindOrCreate(key);
  k->upstream_calls.Add(1);
  if (!status.ok()) k->upstream_errors.Add(1);
}

void ExtentCache::Impl::CountOutcome(KeyState& k, Outcome outcome,
                                     uint64_t cached, uint64_t fetched) {
  switch (outcome) {
    case Outcome::kHit:
      k.hits.Add(1);
      break;
    case Outcome::kPartial:
      k.partial_hits.Add(1);
      break;
    case Outcome::kMiss:
    case Outcome::kBypass:
      k.misses.Add(1);
      break;
  }
  k.bytes_from_cache.Add(cached);
  k.bytes_from_upstream.Add(fetched);
}

namespace {

// Checks an upstream answer and clips it to the export size.
absl::Status ValidateAndClip(ExtentList& answer, uint64_t offset,
                             uint64_t export_size) {
  if (answer.empty()) {
    return absl::InternalError(absl::StrCat(
        "upstream block-status answer at offset ", offset, " is empty"));
  }
  uint64_t pos = offset;
  for (size_t i = 0; i < answer.size(); ++i) {
    const Extent& e = answer[i];
    if (e.offset != pos) {
      return absl::InternalError(absl::StrCat(
          "upstream block-status answer at offset ", offset, ": extent ", i,
          " starts at ", e.offset, ", expected ", pos,
          " (extents must be contiguous from the requested offset)"));
    }
    if (e.length == 0) {
      return absl::InternalError(
          absl::StrCat("upstream block-status answer at offset ", offset,
                       ": extent ", i, " has length 0"));
    }
    if (e.length > kMaxU64 - e.offset) {
      return absl::InternalError(
          absl::StrCat("upstream block-status answer at offset ", offset,
                       ": extent ", i, " overflows 64 bits"));
    }
    pos = e.end();
  }
  // Clip to the export (answer[0] starts at offset < export_size).
  size_t keep = 0;
  while (keep < answer.size() && answer[keep].offset < export_size) ++keep;
  answer.resize(keep);
  Extent& last = answer.back();
  if (last.end() > export_size) last.length = export_size - last.offset;
  return absl::OkStatus();
}

}  // namespace

void ExtentCache::Impl::ReadHead(const KeyState& k, Progress* p) const {
  sync::ReaderMutexLock l(&k.mu);
  p->r.next_offset =
      ReadLocked(k, p->r.next_offset, p->end, p->max_extents, &p->r.extents);
}

FetchPtr ExtentCache::Impl::FindCoverLocked(const KeyState& k, uint64_t gap) {
  FetchPtr cover;
  for (const FetchPtr& f : k.inflight) {
    if (f->start <= gap && gap < f->end &&
        (cover == nullptr || f->start > cover->start)) {
      cover = f;
    }
  }
  return cover;
}

FetchPtr ExtentCache::Impl::RegisterLocked(KeyState& k, uint64_t start,
                                           uint64_t end, bool read_ahead) {
  auto f = std::make_shared<Fetch>(k.next_fetch_id++, start, end, read_ahead);
  k.inflight.push_back(f);
  return f;
}

void ExtentCache::Impl::Issue(
    KeyState& k, std::vector<FetchPtr> fetches,
    const std::shared_ptr<const AsyncFetcher>& fetcher, uint64_t export_size) {
  for (FetchPtr& f : fetches) {
    k.upstream_calls.Add(1);
    const uint64_t start = f->start, length = f->end - f->start;
    // The completion keeps the key and the cache alive (members are
    // destroyed in reverse order: the key before the cache it points into).
    struct Ctx {
      std::shared_ptr<Impl> impl;
      std::shared_ptr<KeyState> key;
      FetchPtr fetch;
      uint64_t export_size;
      int64_t born_ns;
    };
    auto ctx =
        std::make_unique<Ctx>(Ctx{shared_from_this(), k.shared_from_this(),
                                  std::move(f), export_size, NowNs()});
    (*fetcher)(start, length,
               [ctx = std::move(ctx)](absl::StatusOr<ExtentList> a) mutable {
                 ctx->impl->OnFetchDone(*ctx->key, ctx->fetch, std::move(a),
                                        ctx->export_size, ctx->born_ns);
               });
  }
}

bool ExtentCache::Impl::AwaitLocked(KeyState& k, const Fetch& f,
                                    absl::Time deadline) {
  while (!f.done) {
    if (k.mu.WaitWithDeadline(&k.fetch_done, deadline) && !f.done) {
      return false;
    }
  }
  return true;
}

absl::Status ExtentCache::Impl::CheckAnswer(KeyState& k, uint64_t start,
                                            uint64_t export_size,
                                            absl::StatusOr<ExtentList> answer,
                                            ExtentList* out) {
  absl::Status status = answer.status();
  if (status.ok()) {
    *out = *std::move(answer);
    status = ValidateAndClip(*out, start, export_size);
  }
  if (!status.ok()) k.upstream_errors.Add(1);
  return status;
}

void ExtentCache::Impl::ReleaseLocked(KeyState& k, Fetch& f) {
  if (total_mem_.load(std::memory_order_relaxed) > MemoryLimit()) {
    k.mu.Unlock();
    MaybeEvict();
    k.mu.Lock();
  }
  f.done = true;
  k.fetch_done.SignalAll();
}

void ExtentCache::Impl::OnFetchDone(KeyState& k, const FetchPtr& f,
                                    absl::StatusOr<ExtentList> answer,
                                    uint64_t export_size, int64_t born_ns) {
  ExtentList extents;
  absl::Status status =
      CheckAnswer(k, f->start, export_size, std::move(answer), &extents);
  std::vector<FetchPtr> issue;
  std::shared_ptr<const AsyncFetcher> fetcher;
  {
    sync::MutexLock l(&k.mu);
    CompleteLocked(k, *f, std::move(status), std::move(extents), export_size,
                   born_ns, &issue);
    fetcher = k.ra.fetcher;
    ReleaseLocked(k, *f);
  }
  if (!issue.empty()) Issue(k, std::move(issue), fetcher, export_size);
}

absl::StatusOr<bool> ExtentCache::Impl::FetchInline(
    KeyState& k, const FetchPtr& f, const Fetcher& fetch, uint64_t gap,
    uint64_t export_size, absl::Time deadline, Progress* p) {
  k.upstream_calls.Add(1);
  const int64_t born_ns = NowNs();
  ExtentList extents;
  absl::Status status =
      CheckAnswer(k, f->start, export_size,
                  fetch(f->start, f->end - f->start, deadline), &extents);
  // A fetch that is not read-ahead never tops a run up, so nothing is
  // issued; the vector only satisfies CompleteLocked.
  std::vector<FetchPtr> issue;
  sync::MutexLock l(&k.mu);
  CompleteLocked(k, *f, status, std::move(extents), export_size, born_ns,
                 &issue);
  bool appended = false;
  if (status.ok()) {
    appended = AppendAnswer(*f, /*own=*/true, gap, p);
    if (appended) {
      p->fetched_bytes = p->r.next_offset - gap;
      NoteReadLocked(k, gap, p->r.next_offset);
    }
  }
  ReleaseLocked(k, *f);
  if (!status.ok()) return status;
  return appended;
}

uint64_t ExtentCache::Impl::FillBudgetLocked(const KeyState& k) const {
  const uint64_t half = options_.memory_limit_bytes / 2;
  return k.ra.inflight == 0 ? half : half / (1 + k.ra.inflight);
}

void ExtentCache::Impl::CompleteLocked(KeyState& k, Fetch& f,
                                       absl::Status status, ExtentList answer,
                                       uint64_t export_size, int64_t born_ns,
                                       std::vector<FetchPtr>* issue) {
  for (auto it = k.inflight.begin(); it != k.inflight.end(); ++it) {
    if (it->get() == &f) {
      k.inflight.erase(it);
      break;
    }
  }
  if (f.read_ahead) --k.ra.inflight;
  f.status = std::move(status);
  f.clean_end = f.start;
  if (!f.status.ok()) {
    if (f.read_ahead && !f.read) k.read_ahead_wasted.Add(1);
    UpdateLiveLocked(k);
    return;
  }
  // Keep only what no invalidation touched while in flight: the extents
  // that start before the poison mark, the last one cut at it. Usually
  // nothing is cut, and the answer is inserted as it is (no copy).
  size_t n = 0;
  while (n < answer.size() && answer[n].offset < f.poison_from) ++n;
  const bool cut_last = n > 0 && answer[n - 1].end() > f.poison_from;
  if (n < answer.size() || cut_last) {
    k.stale_fills_dropped.Add(1);
    if (f.read_ahead && !f.read) k.read_ahead_wasted.Add(1);
  }
  if (n > 0) {
    f.clean_end = cut_last ? f.poison_from : answer[n - 1].end();
  }
  k.granule.Observe(answer, f.poison_from);
  // Under memory pressure keep the part nearest the fetch start (where the
  // scan reads next), not what an eviction pass would leave.
  const uint64_t max_intervals =
      std::max<uint64_t>(1, FillBudgetLocked(k) / kIntervalBytes);
  const bool cut_budget = n > max_intervals;
  if (cut_budget) n = max_intervals;
  if (n > 0) {
    absl::Span<const Extent> keep(answer.data(), n);
    ExtentList trimmed;
    if (cut_last && !cut_budget) {  // the last extent ends at the mark
      trimmed.assign(keep.begin(), keep.end());
      trimmed.back().length = f.poison_from - trimmed.back().offset;
      keep = trimmed;
    }
    RemoveRangeLocked(k, f.start, keep.back().end());
    InsertLocked(k, keep, born_ns,
                 lru_clock_.fetch_add(1, std::memory_order_relaxed) + 1);
  }
  const uint64_t answer_end = answer.back().end();
  ReadAheadRun& ra = k.ra;
  if (f.read_ahead) {
    ra.run_end = std::max(ra.run_end, answer_end);
    ra.est_bytes = answer.size() * kIntervalBytes;
    if (!f.read && f.clean_end == answer_end) {
      ra.unread.emplace_back(f.start, answer_end);
      const size_t cap = 2 * size_t{options_.read_ahead_windows} + 2;
      if (ra.unread.size() > cap) {
        ra.unread.erase(ra.unread.begin());
        k.read_ahead_wasted.Add(1);
      }
    }
    TopUpLocked(k, issue);
  } else if (answer_end < f.end && answer_end < export_size) {
    // Answered shorter than asked: a window-limited upstream. The next
    // scan step at answer_end starts read-ahead of this length.
    if (ra.window != answer_end - f.start || ra.run_end < f.start ||
        ra.run_end > answer_end + ra.window) {
      ra.run_end = answer_end;
    } else {
      ra.run_end = std::max(ra.run_end, answer_end);
    }
    ra.window = answer_end - f.start;
    ra.est_bytes = answer.size() * kIntervalBytes;
  }
  f.answer = std::move(answer);
  UpdateLiveLocked(k);
}

bool ExtentCache::Impl::AppendAnswer(const Fetch& f, bool own, uint64_t gap,
                                     Progress* p) {
  const uint64_t usable = own ? kMaxU64 : f.clean_end;
  const uint64_t stop = std::min(usable, p->end);
  const uint64_t before = p->r.next_offset;
  // The answer is validated contiguous: the extents that reach past the
  // gap and start before the stop are one slice, found by bisection.
  const auto first =
      std::partition_point(f.answer.begin(), f.answer.end(),
                           [gap](const Extent& e) { return e.end() <= gap; });
  const auto last =
      std::partition_point(first, f.answer.end(),
                           [stop](const Extent& e) { return e.offset < stop; });
  // One allocation for what this call may add, not a doubling series; sized
  // by the slice (a window's answer can be far longer than the request) and
  // by max_extents.
  ExtentList& out = p->r.extents;
  size_t room = static_cast<size_t>(last - first);
  if (p->max_extents != 0) {
    room =
        std::min(room, p->max_extents - std::min(p->max_extents, out.size()));
  }
  out.reserve(out.size() + room);
  for (auto it = first; it != last; ++it) {
    const Extent& e = *it;
    const uint64_t from = std::max(e.offset, gap);
    if (from >= stop ||
        !CanAppend(p->r.extents, p->max_extents, from, e.flags)) {
      break;
    }
    const uint64_t to = std::min(e.end(), stop);
    AppendMerged(&p->r.extents, Extent{from, to - from, e.flags});
    p->r.next_offset = to;
  }
  return p->r.next_offset > before;
}

// --- Read-ahead ---

void ExtentCache::Impl::UpdateLiveLocked(KeyState& k) {
  const bool live =
      k.ra.window > 0 && k.ra.fetcher != nullptr &&
      (k.ra.inflight > 0 || !k.ra.unread.empty() || k.ra.frontier < k.ra.limit);
  k.ra_live.store(live, std::memory_order_relaxed);
}

void ExtentCache::Impl::EndRunLocked(KeyState& k) {
  ReadAheadRun& ra = k.ra;
  k.read_ahead_wasted.Add(ra.unread.size());
  ra.unread.clear();
  ra.frontier = ra.limit = 0;
  ra.fetcher.reset();
  UpdateLiveLocked(k);
}

void ExtentCache::Impl::PlanReadAheadLocked(
    KeyState& k, uint64_t gap, uint64_t demand_end, uint64_t request_end,
    uint64_t export_size, const std::shared_ptr<const AsyncFetcher>& fetcher,
    std::vector<FetchPtr>* issue) {
  const uint64_t n = options_.read_ahead_windows;
  if (n == 0) return;
  ReadAheadRun& ra = k.ra;
  const bool continuing = ra.fetcher != nullptr && ra.frontier > gap &&
                          ra.frontier <= SatAdd(gap, (n + 1) * ra.window);
  uint64_t window, from, limit;
  if (ra.window > 0 && gap <= ra.run_end &&
      SatAdd(gap, ra.window) >= ra.run_end) {
    // The gap is in the last window of a short-answered run: the demand
    // fetch will likely answer one window; fetch the ones after it too.
    window = ra.window;
    from = continuing ? ra.frontier : SatAdd(gap, window);
    limit = export_size;
  } else if (request_end > demand_end) {
    // A request beyond one window (a cold map of a large disk).
    window = demand_end - gap;
    from = continuing && ra.window == window ? ra.frontier : demand_end;
    limit = request_end;
  } else {
    return;
  }
  if (!continuing) EndRunLocked(k);
  ra.window = window;
  ra.frontier = from;
  ra.limit = std::min(limit, export_size);
  ra.read_pos = std::max(continuing ? ra.read_pos : 0, gap);
  ra.export_size = export_size;
  ra.fetcher = fetcher;
  TopUpLocked(k, issue);
}

void ExtentCache::Impl::TopUpLocked(KeyState& k, std::vector<FetchPtr>* issue) {
  ReadAheadRun& ra = k.ra;
  const uint64_t n = options_.read_ahead_windows;
  if (ra.window == 0 || ra.fetcher == nullptr || n == 0) return;
  // As many windows as half the memory bound holds, at least one.
  uint64_t allowed = n;
  if (ra.est_bytes > 0) {
    allowed = std::min<uint64_t>(
        n,
        std::max<uint64_t>(1, options_.memory_limit_bytes / 2 / ra.est_bytes));
  }
  // The window at read_pos is the scan's own (demand) fetch; read-ahead
  // covers the `allowed` windows after it.
  const uint64_t horizon = SatAdd(ra.read_pos, allowed + 1 > kMaxU64 / ra.window
                                                   ? kMaxU64
                                                   : ra.window * (allowed + 1));
  while (ra.inflight < allowed && ra.frontier < ra.limit &&
         ra.frontier < horizon) {
    const uint64_t start = ra.frontier;
    const uint64_t end = std::min(
        {SatAdd(start, ra.window), ra.limit, start + kMaxNbdRequestLength});
    issue->push_back(RegisterLocked(k, start, end, /*read_ahead=*/true));
    ++ra.inflight;
    k.read_ahead_issued.Add(1);
    ra.frontier = end;
  }
  UpdateLiveLocked(k);
}

void ExtentCache::Impl::NoteReadLocked(KeyState& k, uint64_t from,
                                       uint64_t to) {
  ReadAheadRun& ra = k.ra;
  if (ra.window == 0 || to <= from) return;
  // A read behind the frontier is the scan (or a reader of its windows).
  if (from <= ra.frontier && to > ra.read_pos) ra.read_pos = to;
  auto& u = ra.unread;
  for (auto it = u.begin(); it != u.end();) {
    if (it->first < to && from < it->second) {
      k.read_ahead_hits.Add(1);
      it = u.erase(it);
    } else {
      ++it;
    }
  }
  // Windows the scan has passed without reading are wasted.
  while (!u.empty() && u.front().second <= from &&
         from - u.front().second > ra.window) {
    k.read_ahead_wasted.Add(1);
    u.erase(u.begin());
  }
}

void ExtentCache::Impl::NoteHit(KeyState& k, uint64_t from, uint64_t to) {
  std::vector<FetchPtr> issue;
  std::shared_ptr<const AsyncFetcher> fetcher;
  uint64_t export_size;
  {
    sync::MutexLock l(&k.mu);
    NoteReadLocked(k, from, to);
    TopUpLocked(k, &issue);
    fetcher = k.ra.fetcher;
    export_size = k.ra.export_size;
  }
  if (!issue.empty()) Issue(k, std::move(issue), fetcher, export_size);
}

// --- Get ---

absl::StatusOr<LookupResult> ExtentCache::Impl::Get(
    const CacheKey& key, uint64_t export_size, uint64_t offset, uint64_t length,
    size_t max_extents, const std::shared_ptr<const AsyncFetcher>& async,
    const Fetcher* sync, absl::Time deadline) {
  if (length == 0) {
    return absl::InvalidArgumentError("block-status length must be > 0");
  }
  if (offset >= export_size) {
    return absl::OutOfRangeError(absl::StrCat(
        "offset ", offset, " is at or past the export end ", export_size));
  }
  KeyState* k = FindOrCreate(key);
  Progress p;
  p.offset = offset;
  p.end = offset + std::min(length, export_size - offset);
  p.export_size = export_size;
  p.max_extents = max_extents;
  p.r.next_offset = offset;
  ReadHead(*k, &p);
  if (p.Done()) {
    if (k->ra_live.load(std::memory_order_relaxed)) {
      NoteHit(*k, offset, p.r.next_offset);
    }
    return Finish(*k, &p);
  }
  absl::StatusOr<Next> next =
      Round(*k, &p, /*may_join=*/true, async, sync, deadline);
  if (next.ok() && *next == Next::kAgain) {
    next = Round(*k, &p, /*may_join=*/false, async, sync, deadline);
  }
  if (!next.ok()) return next.status();
  return Finish(*k, &p);
}

absl::StatusOr<ExtentCache::Impl::Next> ExtentCache::Impl::Round(
    KeyState& k, Progress* p, bool may_join,
    const std::shared_ptr<const AsyncFetcher>& async, const Fetcher* sync,
    absl::Time deadline) {
  std::vector<FetchPtr> issue;
  Claim c;
  {
    sync::MutexLock l(&k.mu);
    absl::StatusOr<Claim> claimed =
        ClaimLocked(k, p, may_join, async, deadline, &issue);
    if (!claimed.ok()) return claimed.status();
    c = *std::move(claimed);
  }
  if (c.f == nullptr) return Next::kAnswered;
  if (c.own && sync != nullptr) {
    // No read-ahead without a detached fetcher: ours is the only record.
    absl::StatusOr<bool> got =
        FetchInline(k, c.f, *sync, c.gap, p->export_size, deadline, p);
    if (!got.ok()) return got.status();
    return *got ? Next::kAnswered : Next::kAgain;
  }
  // Top-ups go through the run's fetcher (ours when we started it).
  if (!issue.empty()) Issue(k, std::exchange(issue, {}), async, p->export_size);
  absl::StatusOr<Next> next;
  {
    sync::MutexLock l(&k.mu);
    next = CollectLocked(k, c, p, async != nullptr, deadline, &issue);
  }
  if (!issue.empty()) Issue(k, std::move(issue), async, p->export_size);
  return next;
}

absl::StatusOr<ExtentCache::Impl::Claim> ExtentCache::Impl::ClaimLocked(
    KeyState& k, Progress* p, bool may_join,
    const std::shared_ptr<const AsyncFetcher>& async, absl::Time deadline,
    std::vector<FetchPtr>* issue) {
  Claim c;
  p->r.next_offset =
      ReadLocked(k, p->r.next_offset, p->end, p->max_extents, &p->r.extents);
  if (p->Done()) return c;
  c.gap = p->r.next_offset;
  if (!p->upstream) p->head_bytes = c.gap - p->offset;
  p->upstream = true;
  NoteReadLocked(k, p->offset, c.gap);
  if (may_join) c.f = FindCoverLocked(k, c.gap);
  if (c.f != nullptr) {
    k.coalesced_waits.Add(1);
    if (c.f->read_ahead && !c.f->read) {
      c.f->read = true;
      k.read_ahead_hits.Add(1);
    }
    if (async != nullptr) TopUpLocked(k, issue);
    return c;
  }
  // (No clock read for callers without a deadline.)
  if (deadline != absl::InfiniteFuture() && absl::Now() >= deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        "deadline passed before asking the upstream at offset ", c.gap));
  }
  // A request longer than the window asks for it all in one call, unless
  // read-ahead will fetch the windows after this one in parallel.
  const bool parallel = async != nullptr && options_.read_ahead_windows > 0;
  const uint64_t ask = std::min(
      {parallel ? options_.fetch_window_bytes
                : std::max(options_.fetch_window_bytes, p->end - c.gap),
       kMaxNbdRequestLength, p->export_size - c.gap});
  c.f = RegisterLocked(k, c.gap, c.gap + ask, /*read_ahead=*/false);
  c.own = true;
  if (async != nullptr) {
    issue->push_back(c.f);
    PlanReadAheadLocked(k, c.gap, c.gap + ask, p->end, p->export_size, async,
                        issue);
  }
  return c;
}

absl::StatusOr<ExtentCache::Impl::Next> ExtentCache::Impl::CollectLocked(
    KeyState& k, const Claim& c, Progress* p, bool detached,
    absl::Time deadline, std::vector<FetchPtr>* issue) {
  if (!AwaitLocked(k, *c.f, deadline)) return DetachedLocked(k, c.gap);
  if (!c.f->status.ok()) {
    if (c.own) return c.f->status;
    return Next::kAgain;  // the fetch we waited for failed: fetch ourselves
  }
  if (!AppendAnswer(*c.f, c.own, c.gap, p)) return Next::kAgain;
  if (c.own) p->fetched_bytes = p->r.next_offset - c.gap;
  NoteReadLocked(k, c.gap, p->r.next_offset);
  if (detached) TopUpLocked(k, issue);
  return Next::kAnswered;
}

absl::Status ExtentCache::Impl::DetachedLocked(KeyState& k, uint64_t gap) {
  k.detached_waits.Add(1);
  return absl::DeadlineExceededError(absl::StrCat(
      "deadline passed waiting for the upstream block-status answer at "
      "offset ",
      gap, " (the call runs on; its answer will be cached)"));
}

absl::StatusOr<LookupResult> ExtentCache::Impl::Finish(KeyState& k,
                                                       Progress* p) {
  const bool answered = !p->r.extents.empty() || p->Done();
  p->r.outcome = !answered           ? Outcome::kMiss
                 : !p->upstream      ? Outcome::kHit
                 : p->head_bytes > 0 ? Outcome::kPartial
                                     : Outcome::kMiss;
  CountOutcome(k, p->r.outcome, p->r.next_offset - p->offset - p->fetched_bytes,
               p->fetched_bytes);
  if (p->r.extents.empty()) {
    return absl::InternalError(absl::StrCat("no block-status answer at offset ",
                                            p->offset, " after two attempts"));
  }
  return std::move(p->r);
}

ExtentCache::Dropped ExtentCache::Impl::InvalidateKeys(
    const std::vector<KeyState*>& keys, uint64_t range_offset, uint64_t length,
    bool write) {
  const uint64_t range_end =
      length == 0 ? kMaxU64 : SatAdd(range_offset, length);
  Dropped total;
  for (KeyState* k : keys) {
    IntervalMap doomed(
        std::less<uint64_t>(),
        CountingAllocator<std::pair<const uint64_t, Interval>>(&k->mem));
    {
      sync::MutexLock l(&k->mu);
      k->invalidations.Add(1);
      auto [offset, end] = write ? k->granule.RoundOut(range_offset, range_end)
                                 : std::make_pair(range_offset, range_end);
      if (!write && offset == 0 && end == kMaxU64) k->granule.Reset();
      // Every fetch in flight (demand or read-ahead) that the range reaches
      // (an answer may run past the window asked for): its answer is not
      // cached from the first invalidated byte on.
      for (const FetchPtr& f : k->inflight) {
        if (end > f->start) {
          f->poison_from = std::min(f->poison_from, std::max(offset, f->start));
        }
      }
      if (offset == 0 && end == kMaxU64) {
        // Everything: count, then free the nodes outside the lock.
        for (const auto& [start, iv] : k->map) {
          ++total.extents;
          total.bytes += iv.end - start;
        }
        doomed.swap(k->map);
      } else {
        Dropped d = RemoveRangeLocked(*k, offset, end);
        total.extents += d.extents;
        total.bytes += d.bytes;
      }
    }
  }
  // Splitting an interval can allocate a node.
  MaybeEvict();
  return total;
}

void ExtentCache::Impl::MaybeEvict() {
  const int64_t limit = MemoryLimit();
  if (total_mem_.load(std::memory_order_relaxed) <= limit) return;
  sync::MutexLock evict_lock(&evict_mu_);
  const int64_t low_water = limit - limit / 8;
  bool spare_young = true;
  for (int pass = 0;
       pass < 64 && total_mem_.load(std::memory_order_relaxed) > limit;
       ++pass) {
    const std::vector<KeyState*> keys = KeysOf(nullptr);
    const uint32_t now = lru_clock_.load(std::memory_order_relaxed);
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
    if (EvictPass(keys, now, cutoff) == 0) spare_young = false;
  }
}

uint64_t ExtentCache::Impl::EvictPass(const std::vector<KeyState*>& keys,
                                      uint32_t now, uint32_t cutoff_age) {
  uint64_t evicted = 0;
  for (KeyState* k : keys) {
    uint64_t resume = 0;
    bool more = true;
    while (more) {
      sync::MutexLock l(&k->mu);
      const int64_t ttl = k->ttl_ns.load(std::memory_order_relaxed);
      const int64_t now_ns = ttl == kNoTtl ? 0 : NowNs();
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

CacheCounters ExtentCache::Impl::CountersOf(const KeyState& k) {
  CacheCounters c;
  c.hits = k.hits.Get();
  c.partial_hits = k.partial_hits.Get();
  c.misses = k.misses.Get();
  c.upstream_calls = k.upstream_calls.Get();
  c.upstream_errors = k.upstream_errors.Get();
  c.coalesced_waits = k.coalesced_waits.Get();
  c.detached_waits = k.detached_waits.Get();
  c.read_ahead_issued = k.read_ahead_issued.Get();
  c.read_ahead_hits = k.read_ahead_hits.Get();
  c.read_ahead_wasted = k.read_ahead_wasted.Get();
  c.bytes_from_cache = k.bytes_from_cache.Get();
  c.bytes_from_upstream = k.bytes_from_upstream.Get();
  c.evictions = k.evictions.Get();
  c.invalidations = k.invalidations.Get();
  c.stale_fills_dropped = k.stale_fills_dropped.Get();
  {
    sync::ReaderMutexLock l(&k.mu);
    c.entries = k.map.size();
  }
  c.memory_bytes = static_cast<uint64_t>(
      std::max<int64_t>(0, k.mem.bytes.load(std::memory_order_relaxed)));
  return c;
}

// ---------------------------------------------------------------------------

ExtentCache::ExtentCache(Options options)
    : options_(std::move(options)), impl_(std::make_shared<Impl>(options_)) {}

ExtentCache::~ExtentCache() = default;

LookupResult ExtentCache::Lookup(const CacheKey& key, uint64_t offset,
                                 uint64_t length, size_t max_extents) const {
  return impl_->Lookup(key, offset, length, max_extents);
}

void ExtentCache::Record(const CacheKey& key, uint64_t offset,
                         const LookupResult& r) {
  impl_->Record(key, offset, r);
}

void ExtentCache::RecordUpstreamCall(const CacheKey& key,
                                     const absl::Status& status) {
  impl_->RecordUpstreamCall(key, status);
}

absl::StatusOr<LookupResult> ExtentCache::Get(
    const CacheKey& key, uint64_t export_size, uint64_t offset, uint64_t length,
    size_t max_extents, const AsyncFetcher& fetch, absl::Time deadline) {
  return impl_->Get(key, export_size, offset, length, max_extents,
                    std::make_shared<const AsyncFetcher>(fetch),
                    /*sync=*/nullptr, deadline);
}

absl::StatusOr<LookupResult> ExtentCache::Get(const CacheKey& key,
                                              uint64_t export_size,
                                              uint64_t offset, uint64_t length,
                                              size_t max_extents, Fetcher fetch,
                                              absl::Time deadline) {
  // Runs inline (Impl::FetchInline): the reference never outlives this
  // frame.
  return impl_->Get(key, export_size, offset, length, max_extents,
                    /*async=*/nullptr, &fetch, deadline);
}

ExtentCache::Dropped ExtentCache::Invalidate(const CacheKey& key,
                                             uint64_t offset, uint64_t length) {
  KeyState* k = impl_->Find(key);
  if (k == nullptr) return Dropped{};
  return impl_->InvalidateKeys({k}, offset, length);
}

ExtentCache::Dropped ExtentCache::InvalidateExportRange(
    const std::string& export_name, uint64_t offset, uint64_t length) {
  return impl_->InvalidateKeys(impl_->KeysOf(&export_name), offset, length,
                               /*write=*/true);
}

ExtentCache::Dropped ExtentCache::InvalidateExport(
    const std::string& export_name) {
  return impl_->InvalidateKeys(impl_->KeysOf(&export_name), 0, 0);
}

ExtentCache::Dropped ExtentCache::InvalidateAll() {
  return impl_->InvalidateKeys(impl_->KeysOf(nullptr), 0, 0);
}

void ExtentCache::SetExportTtl(const std::string& export_name,
                               absl::Duration ttl) {
  impl_->SetExportTtl(export_name, ttl);
}

CacheCounters ExtentCache::Counters() const {
  CacheCounters total;
  for (KeyState* k : impl_->KeysOf(nullptr)) {
    total += Impl::CountersOf(*k);
  }
  return total;
}

CacheCounters ExtentCache::Counters(const CacheKey& key) const {
  KeyState* k = impl_->Find(key);
  return k == nullptr ? CacheCounters{} : Impl::CountersOf(*k);
}

std::vector<CacheKey> ExtentCache::Keys() const {
  std::vector<CacheKey> out;
  for (KeyState* k : impl_->KeysOf(nullptr)) out.push_back(k->key);
  std::sort(out.begin(), out.end(), [](const CacheKey& a, const CacheKey& b) {
    return std::tie(a.export_name, a.context) <
           std::tie(b.export_name, b.context);
  });
  return out;
}

ExtentCache::Dropped ExtentCache::RemoveExport(const std::string& export_name) {
  // Poisons in-flight fetches and frees the intervals first, then takes the
  // keys out so Keys() and Counters() forget them. The KeyState records
  // themselves move to retired_: lock-free readers (Counters, eviction) may
  // still hold pointers to them.
  Dropped d = InvalidateExport(export_name);
  sync::MutexLock l(&impl_->keys_mu_);
  impl_->export_ttl_.erase(export_name);
  for (auto it = impl_->keys_.begin(); it != impl_->keys_.end();) {
    if (it->first.export_name == export_name) {
      impl_->retired_.push_back(std::move(it->second));
      impl_->keys_.erase(it++);
    } else {
      ++it;
    }
  }
  return d;
}

}  // namespace blockmeta
