// server/cache/extent_cache.cc — ExtentCache: per-key interval maps,
// Lookup/Get with single-flight fills and poison marks, invalidation.
//
// Layout. keys_ (under keys_mu_) maps a CacheKey to a KeyState
// (key_state.h) that lives as long as the cache (pointers to it stay valid
// without keys_mu_). Each KeyState has its own mutex guarding its interval
// map and its list of in-flight fetches; counters and memory accounting are
// relaxed atomics. Which windows to fetch ahead of a scan is decided by
// read_ahead.h; the memory bound and LRU eviction live in eviction.h.
//
// Lock order: Evictor's lock -> keys_mu_ -> KeyState::mu. keys_mu_ is never
// held while a KeyState::mu is taken, and no lock is held across the Fetcher.
//
// Size: about 1.1k lines, over the usual 800, on purpose: the interval map
// operations, the fill path (poison trim, insert) and the steps of Get()
// keep one set of invariants and are read together; read-ahead policy and
// eviction, which only need the key's state, live in their own units.
#include "server/cache/extent_cache.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/cache/eviction.h"
#include "server/cache/granule.h"
#include "server/cache/key_state.h"
#include "server/cache/read_ahead.h"
#include "server/common/mutex.h"

namespace blockmeta {

using cache_internal::CountingAllocator;
using cache_internal::Expired;
using cache_internal::Fetch;
using cache_internal::FetchPtr;
using cache_internal::Interval;
using cache_internal::IntervalMap;
using cache_internal::KeyState;
using cache_internal::kIntervalBytes;
using cache_internal::kMaxU64;
using cache_internal::kNoTtl;
using cache_internal::LruTick;
using cache_internal::ReadAheadScheduler;
using cache_internal::SatAdd;
using cache_internal::TtlNs;

namespace {

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

// A copy of `s` with a representation of its own. A fetch record's error
// is shared by threads that may free the record last; absl::Status frees
// its representation in libabsl (not built with TSan here), so a shared one
// would show as a false race in --config=tsan runs. Errors only (rare).
absl::Status OwnCopy(const absl::Status& s) {
  absl::Status out(s.code(), s.message());
  s.ForEachPayload([&out](absl::string_view url, const absl::Cord& payload) {
    out.SetPayload(url, payload);
  });
  return out;
}

bool CanAppend(const ExtentList& out, size_t max_extents, uint64_t offset,
               uint32_t flags) {
  if (max_extents == 0 || out.size() < max_extents) return true;
  return !out.empty() && out.back().end() == offset &&
         out.back().flags == flags;
}

}  // namespace

class ExtentCache::Impl : public std::enable_shared_from_this<Impl> {
 public:
  explicit Impl(const Options& options)
      : options_(Clamped(options)),
        evictor_(options_.memory_limit_bytes),
        read_ahead_(options_.read_ahead_windows, options_.memory_limit_bytes,
                    options_.fetch_window_bytes) {}

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
  void SetExportPrefetch(const std::string& export_name, uint32_t parallel);
  uint32_t ExportPrefetch(const std::string& export_name) const;
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
  // After fetch f completed: a prefetch window continues the prefetch; a
  // caller's own fetch frees the slot the prefetch yielded to it.
  void PrefetchAfterLocked(KeyState& k, const Fetch& f, bool ok,
                           uint64_t answer_end, size_t answer_extents,
                           std::vector<FetchPtr>* issue)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu) {
    if (f.prefetch) {
      read_ahead_.OnPrefetchDoneLocked(k, f, ok, answer_end, answer_extents,
                                       evictor_.NearLimit(), issue);
    } else {
      // A caller's fetch or a read-ahead window that a write cut: the
      // prefetch maps what it did not bring (a write may forget a whole
      // context while its granule bound is unknown, cutting every fetch).
      if (ok && f.poison_from < std::min(f.end, answer_end)) {
        ReadAheadScheduler::RewindPrefetchLocked(k, f.clean_end);
      }
      read_ahead_.TopUpPrefetchLocked(k, evictor_.NearLimit(), issue);
    }
  }
  // The fetcher that issues windows scheduled for k (read-ahead or
  // prefetch; every fetcher of a key reaches the same upstream).
  static std::shared_ptr<const AsyncFetcher> ScheduledFetcherLocked(
      const KeyState& k) ABSL_SHARED_LOCKS_REQUIRED(k.mu) {
    if (k.ra.fetcher != nullptr) return k.ra.fetcher;
    if (k.pf.fetcher != nullptr) return k.pf.fetcher;
    return k.ra.last_fetcher;
  }
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

  // A caller was handed [from, to) of a request reaching request_end (0 =
  // unknown): follows the walk, counts read-ahead hits and tops read-ahead
  // up, taking the key lock only when there is work to do.
  void HandOut(KeyState& k, uint64_t from, uint64_t to, uint64_t request_end,
               uint64_t export_size);
  // Evicts when over the memory bound (no key lock held).
  void MaybeEvict() {
    evictor_.MaybeEvict([this] { return KeysOf(nullptr); },
                        [this] { return NowNs(); });
  }

  const Options options_;
  cache_internal::Evictor evictor_;
  const ReadAheadScheduler read_ahead_;

  mutable sync::Mutex keys_mu_;
  absl::flat_hash_map<CacheKey, std::shared_ptr<KeyState>> keys_
      ABSL_GUARDED_BY(keys_mu_);
  absl::flat_hash_map<std::string, absl::Duration> export_ttl_
      ABSL_GUARDED_BY(keys_mu_);
  absl::flat_hash_map<std::string, uint32_t> export_prefetch_
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
        key, evictor_.total(),
        TtlNs(ttl == export_ttl_.end() ? options_.ttl : ttl->second));
    auto pf = export_prefetch_.find(key.export_name);
    if (pf != export_prefetch_.end()) slot->prefetch_parallel.store(pf->second);
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

void ExtentCache::Impl::SetExportPrefetch(const std::string& export_name,
                                          uint32_t parallel) {
  sync::MutexLock l(&keys_mu_);
  export_prefetch_[export_name] = parallel;
  for (const auto& [key, state] : keys_) {
    if (key.export_name == export_name) {
      state->prefetch_parallel.store(parallel);
    }
  }
}

uint32_t ExtentCache::Impl::ExportPrefetch(
    const std::string& export_name) const {
  sync::ReaderMutexLock l(&keys_mu_);
  auto it = export_prefetch_.find(export_name);
  return it == export_prefetch_.end() ? 0 : it->second;
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
  const uint32_t tick = evictor_.Now();
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
  HandOut(*k, offset, r.next_offset, 0, 0);
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
  if (evictor_.OverLimit()) {
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
    fetcher = ScheduledFetcherLocked(k);
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
  // A caller's own fetch tops up only a prefetch started by a detached
  // Get() of the key (it yields to callers): issued with its fetcher.
  std::vector<FetchPtr> issue;
  std::shared_ptr<const AsyncFetcher> scheduled;
  absl::Cleanup issue_after_unlock = [&] {
    if (!issue.empty()) Issue(k, std::move(issue), scheduled, export_size);
  };
  sync::MutexLock l(&k.mu);
  CompleteLocked(k, *f, status, std::move(extents), export_size, born_ns,
                 &issue);
  scheduled = ScheduledFetcherLocked(k);
  bool appended = false;
  if (status.ok()) {
    appended = AppendAnswer(*f, /*own=*/true, gap, p);
    if (appended) {
      p->fetched_bytes = p->r.next_offset - gap;
      ReadAheadScheduler::NoteReadLocked(k, gap, p->r.next_offset);
    }
  }
  ReleaseLocked(k, *f);
  if (!status.ok()) return OwnCopy(status);
  return appended;
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
  ReadAheadScheduler::RetireLocked(k, f);
  f.status = std::move(status);
  f.clean_end = f.start;
  if (!f.status.ok()) {
    read_ahead_.OnCompleteLocked(k, f, /*ok=*/false, 0, 0, export_size, issue);
    PrefetchAfterLocked(k, f, /*ok=*/false, 0, 0, issue);
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
      std::max<uint64_t>(1, read_ahead_.FillBudgetLocked(k) / kIntervalBytes);
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
    InsertLocked(k, keep, born_ns, evictor_.NextTick());
  }
  const uint64_t answer_end = answer.back().end();
  read_ahead_.OnCompleteLocked(k, f, /*ok=*/true, answer_end, answer.size(),
                               export_size, issue);
  PrefetchAfterLocked(k, f, /*ok=*/true, answer_end, answer.size(), issue);
  f.answer = std::move(answer);
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

// --- Read-ahead (the policy lives in read_ahead.cc) ---

void ExtentCache::Impl::HandOut(KeyState& k, uint64_t from, uint64_t to,
                                uint64_t request_end, uint64_t export_size) {
  const ReadAheadScheduler::Step step =
      read_ahead_.WalkStep(k, from, to, request_end, export_size);
  if (!step.lock) return;
  std::vector<FetchPtr> issue;
  std::shared_ptr<const AsyncFetcher> fetcher;
  uint64_t size;
  {
    sync::MutexLock l(&k.mu);
    read_ahead_.OnHandOutLocked(k, from, to, step.walk, &issue);
    fetcher = ScheduledFetcherLocked(k);
    size = k.ra.fetcher != nullptr ? k.ra.export_size : k.pf.export_size;
  }
  if (!issue.empty()) Issue(k, std::move(issue), fetcher, size);
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
    HandOut(*k, offset, p.r.next_offset, p.end, export_size);
    return Finish(*k, &p);
  }
  absl::StatusOr<Next> next =
      Round(*k, &p, /*may_join=*/true, async, sync, deadline);
  if (next.ok() && *next == Next::kAgain) {
    next = Round(*k, &p, /*may_join=*/false, async, sync, deadline);
  }
  if (!next.ok()) return next.status();
  if (async != nullptr && p.r.next_offset > offset) {
    HandOut(*k, offset, p.r.next_offset, p.end, export_size);
  }
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
  ReadAheadScheduler::NoteReadLocked(k, p->offset, c.gap);
  if (may_join) c.f = FindCoverLocked(k, c.gap);
  if (c.f != nullptr) {
    k.coalesced_waits.Add(1);
    if (c.f->prefetch && !c.f->read) {
      c.f->read = true;
      k.prefetch_hits.Add(1);
    }
    if (c.f->read_ahead && !c.f->read) {
      c.f->read = true;
      k.read_ahead_hits.Add(1);
    }
    if (async != nullptr) read_ahead_.TopUpLocked(k, issue);
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
  c.f = k.RegisterLocked(c.gap, c.gap + ask, /*read_ahead=*/false);
  c.own = true;
  if (async != nullptr) {
    issue->push_back(c.f);
    read_ahead_.MaybeStartPrefetchLocked(k, p->export_size, async,
                                         evictor_.NearLimit(), issue);
    read_ahead_.PlanLocked(k, p->offset, c.gap, c.gap + ask, p->end,
                           p->export_size, async, issue);
  }
  return c;
}

absl::StatusOr<ExtentCache::Impl::Next> ExtentCache::Impl::CollectLocked(
    KeyState& k, const Claim& c, Progress* p, bool detached,
    absl::Time deadline, std::vector<FetchPtr>* issue) {
  if (!AwaitLocked(k, *c.f, deadline)) return DetachedLocked(k, c.gap);
  if (!c.f->status.ok()) {
    if (c.own) return OwnCopy(c.f->status);
    return Next::kAgain;  // the fetch we waited for failed: fetch ourselves
  }
  if (!AppendAnswer(*c.f, c.own, c.gap, p)) return Next::kAgain;
  if (c.own) p->fetched_bytes = p->r.next_offset - c.gap;
  ReadAheadScheduler::NoteReadLocked(k, c.gap, p->r.next_offset);
  if (detached) read_ahead_.TopUpLocked(k, issue);
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
        // A finished prefetch maps the export again on the next touch
        // (the upstream reconnected and may serve another image).
        ReadAheadScheduler::ResetPrefetchLocked(*k);
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
  c.read_ahead_walks = k.read_ahead_walks.Get();
  c.prefetch_issued = k.prefetch_issued.Get();
  c.prefetch_bytes = k.prefetch_bytes.Get();
  c.prefetch_hits = k.prefetch_hits.Get();
  c.prefetch_completed = k.prefetch_completed.Get();
  {
    sync::ReaderMutexLock l(&k.mu);
    c.entries = k.map.size();
    c.prefetch_inflight = k.pf.inflight;
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

void ExtentCache::SetExportPrefetch(const std::string& export_name,
                                    uint32_t parallel) {
  impl_->SetExportPrefetch(export_name, parallel);
}

uint32_t ExtentCache::ExportPrefetch(const std::string& export_name) const {
  return impl_->ExportPrefetch(export_name);
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
  for (KeyState* k : impl_->KeysOf(&export_name)) {
    sync::MutexLock l(&k->mu);
    ReadAheadScheduler::ForgetLocked(*k);  // drops the fetchers it holds
  }
  sync::MutexLock l(&impl_->keys_mu_);
  impl_->export_ttl_.erase(export_name);
  impl_->export_prefetch_.erase(export_name);
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
