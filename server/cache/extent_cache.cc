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
  void Add(uint64_t n) { v_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t Get() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

// A fetch in flight for one key: the window it asked for and the first
// byte (>= start) an invalidation touched since it was registered.
struct Inflight {
  uint64_t id;
  uint64_t start;
  uint64_t end;
  uint64_t poison_from;
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

bool IsInflight(const std::vector<Inflight>& inflight, uint64_t id) {
  for (const Inflight& f : inflight) {
    if (f.id == id) return true;
  }
  return false;
}

bool CanAppend(const ExtentList& out, size_t max_extents, uint64_t offset,
               uint32_t flags) {
  if (max_extents == 0 || out.size() < max_extents) return true;
  return !out.empty() && out.back().end() == offset &&
         out.back().flags == flags;
}

}  // namespace

// Everything the cache knows about one (export, context).
struct KeyState {
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
  Counter hits, partial_hits, misses, upstream_calls, coalesced_waits,
      bytes_from_cache, bytes_from_upstream, evictions, invalidations,
      stale_fills_dropped;

  // Protected by mu.
  mutable sync::Mutex mu;
  // Signalled (all waiters) whenever a fetch of this key completes.
  absl::CondVar fetch_done;
  // Disjoint nonempty intervals; adjacent ones have different flags.
  IntervalMap map ABSL_GUARDED_BY(mu);
  std::vector<Inflight> inflight ABSL_GUARDED_BY(mu);
  uint64_t next_fetch_id ABSL_GUARDED_BY(mu) = 1;
};

class ExtentCache::Impl {
 public:
  explicit Impl(const Options& options) : options_(options) {}

  LookupResult Lookup(const CacheKey& key, uint64_t offset, uint64_t length,
                      size_t max_extents, bool count);
  absl::StatusOr<LookupResult> Get(const CacheKey& key, uint64_t export_size,
                                   uint64_t offset, uint64_t length,
                                   size_t max_extents, Fetcher fetch,
                                   absl::Time deadline);
  Dropped InvalidateKeys(const std::vector<KeyState*>& keys, uint64_t offset,
                         uint64_t length);
  void SetExportTtl(const std::string& export_name, absl::Duration ttl);
  static CacheCounters CountersOf(const KeyState& k);

  KeyState* Find(const CacheKey& key) const;
  KeyState* FindOrCreate(const CacheKey& key);
  // Keys of one export, or all keys when export_name is null.
  std::vector<KeyState*> KeysOf(const std::string* export_name) const;

 private:
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
  void InsertLocked(KeyState& k, const ExtentList& answer, int64_t born_ns,
                    uint32_t tick) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  void MaybeEvict();
  uint64_t EvictPass(const std::vector<KeyState*>& keys, uint32_t now,
                     uint32_t cutoff_age);

  const Options& options_;
  std::atomic<int64_t> total_mem_{0};
  // LRU clock: advances once per fill.
  std::atomic<uint32_t> lru_clock_{1};

  // Serializes eviction passes (taken before keys_mu_ and KeyState::mu).
  sync::Mutex evict_mu_ ABSL_ACQUIRED_BEFORE(keys_mu_);
  mutable sync::Mutex keys_mu_;
  absl::flat_hash_map<CacheKey, std::unique_ptr<KeyState>> keys_
      ABSL_GUARDED_BY(keys_mu_);
  absl::flat_hash_map<std::string, absl::Duration> export_ttl_
      ABSL_GUARDED_BY(keys_mu_);
  // Keys of removed exports (ExtentCache::RemoveExport): out of keys_, maps
  // emptied, kept because KeyState pointers must stay valid.
  std::vector<std::unique_ptr<KeyState>> retired_ ABSL_GUARDED_BY(keys_mu_);
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
  std::unique_ptr<KeyState>& slot = keys_[key];
  if (slot == nullptr) {
    auto ttl = export_ttl_.find(key.export_name);
    slot = std::make_unique<KeyState>(
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

void ExtentCache::Impl::InsertLocked(KeyState& k, const ExtentList& answer,
                                     int64_t born_ns, uint32_t tick) {
  if (answer.empty()) return;
  IntervalMap& m = k.map;
  const int64_t ttl = k.ttl_ns.load(std::memory_order_relaxed);
  const int64_t now_ns = ttl == kNoTtl ? 0 : NowNs();
  const uint64_t start = answer.front().offset;
  auto hint = m.lower_bound(start);  // first interval after the hole
  IntervalMap::iterator last;
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
          last = prev;
          hint = std::next(last);
          first = false;
          continue;
        }
      }
    }
    last = m.emplace_hint(hint, run_start,
                          Interval{run_end, born_ns, flags, LruTick(tick)});
    hint = std::next(last);
    first = false;
  }
  // Merge the right neighbour into the last run if it touches it.
  if (hint != m.end() && hint->first == last->second.end &&
      hint->second.flags == last->second.flags) {
    if (!Expired(hint->second, now_ns, ttl)) {
      last->second.end = hint->second.end;
      last->second.born_ns =
          std::min(last->second.born_ns, hint->second.born_ns);
    } else {
      k.evictions.Add(1);
    }
    m.erase(hint);
  }
}

LookupResult ExtentCache::Impl::Lookup(const CacheKey& key, uint64_t offset,
                                       uint64_t length, size_t max_extents,
                                       bool count) {
  LookupResult r;
  r.next_offset = offset;
  r.outcome = Outcome::kMiss;
  KeyState* k = count ? FindOrCreate(key) : Find(key);
  if (k == nullptr) return r;
  const uint64_t end = SatAdd(offset, length);
  if (length > 0) {
    sync::ReaderMutexLock l(&k->mu);
    r.next_offset = ReadLocked(*k, offset, end, max_extents, &r.extents);
  }
  if (r.next_offset == end && length > 0) {
    r.outcome = Outcome::kHit;
  } else if (!r.extents.empty()) {
    r.outcome = max_extents != 0 && r.extents.size() >= max_extents
                    ? Outcome::kHit
                    : Outcome::kPartial;
  }
  if (count) {
    (r.outcome == Outcome::kHit       ? k->hits
     : r.outcome == Outcome::kPartial ? k->partial_hits
                                      : k->misses)
        .Add(1);
    k->bytes_from_cache.Add(r.next_offset - offset);
  }
  return r;
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

absl::StatusOr<LookupResult> ExtentCache::Impl::Get(
    const CacheKey& key, uint64_t export_size, uint64_t offset, uint64_t length,
    size_t max_extents, Fetcher fetch, absl::Time deadline) {
  if (length == 0) {
    return absl::InvalidArgumentError("block-status length must be > 0");
  }
  if (offset >= export_size) {
    return absl::OutOfRangeError(absl::StrCat(
        "offset ", offset, " is at or past the export end ", export_size));
  }
  const uint64_t end = offset + std::min(length, export_size - offset);
  KeyState* k = FindOrCreate(key);
  LookupResult r;
  r.next_offset = offset;
  {
    sync::ReaderMutexLock l(&k->mu);
    r.next_offset = ReadLocked(*k, offset, end, max_extents, &r.extents);
  }
  auto done = [&] {
    return r.next_offset >= end ||
           (max_extents != 0 && r.extents.size() >= max_extents);
  };
  bool waited = false;
  uint64_t wait_gap = 0;
  bool upstream = false;    // this call waited for or made a fetch
  uint64_t head_bytes = 0;  // cached bytes before the first wait/fetch
  uint64_t fetched_bytes = 0;
  while (!done()) {
    uint64_t gap;
    uint64_t ask;
    uint64_t id;
    {
      sync::MutexLock l(&k->mu);
      // A fill may have landed since the last read.
      r.next_offset =
          ReadLocked(*k, r.next_offset, end, max_extents, &r.extents);
      // After a coalesced wait that brought something, answer with it.
      if (done() || (waited && r.next_offset > wait_gap)) break;
      gap = r.next_offset;
      if (!upstream) head_bytes = gap - offset;
      upstream = true;
      if (!waited) {
        const Inflight* cover = nullptr;
        for (const Inflight& f : k->inflight) {
          if (f.start <= gap && gap < f.end) cover = &f;
        }
        if (cover != nullptr) {
          waited = true;
          k->coalesced_waits.Add(1);
          const uint64_t wait_id = cover->id;
          wait_gap = gap;
          while (IsInflight(k->inflight, wait_id)) {
            if (k->mu.WaitWithDeadline(&k->fetch_done, deadline) &&
                IsInflight(k->inflight, wait_id)) {
              return absl::DeadlineExceededError(absl::StrCat(
                  "deadline passed waiting for a coalesced upstream "
                  "block-status call at offset ",
                  gap));
            }
          }
          continue;  // re-read what it brought
        }
      }
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "deadline passed before asking the upstream at offset ", gap));
      }
      ask = std::min({std::max(options_.fetch_window_bytes, end - gap),
                      kMaxNbdRequestLength, export_size - gap});
      id = k->next_fetch_id++;
      k->inflight.push_back(Inflight{id, gap, gap + ask, kMaxU64});
    }

    // The upstream call, with no lock held.
    k->upstream_calls.Add(1);
    const int64_t born_ns = NowNs();
    absl::StatusOr<ExtentList> answer = fetch(gap, ask, deadline);
    absl::Status status = answer.status();
    if (status.ok()) status = ValidateAndClip(*answer, gap, export_size);

    {
      sync::MutexLock l(&k->mu);
      uint64_t poison_from = kMaxU64;
      for (auto it = k->inflight.begin(); it != k->inflight.end(); ++it) {
        if (it->id == id) {
          poison_from = it->poison_from;
          k->inflight.erase(it);
          break;
        }
      }
      k->fetch_done.SignalAll();
      if (status.ok()) {
        // Keep only what no invalidation touched while in flight.
        ExtentList keep;
        for (const Extent& e : *answer) {
          if (e.offset >= poison_from) break;
          keep.push_back(e);
          if (keep.back().end() > poison_from) {
            keep.back().length = poison_from - e.offset;
          }
        }
        if (keep.size() != answer->size() ||
            (!keep.empty() && keep.back() != answer->back())) {
          k->stale_fills_dropped.Add(1);
        }
        if (!keep.empty()) {
          RemoveRangeLocked(*k, gap, keep.back().end());
          InsertLocked(*k, keep, born_ns,
                       lru_clock_.fetch_add(1, std::memory_order_relaxed));
        }
      }
    }
    if (!status.ok()) return status;

    // Our own answer for the rest of the request.
    for (const Extent& e : *answer) {
      if (e.offset >= end ||
          !CanAppend(r.extents, max_extents, e.offset, e.flags)) {
        break;
      }
      const uint64_t e_end = std::min(e.end(), end);
      AppendMerged(&r.extents, Extent{e.offset, e_end - e.offset, e.flags});
      r.next_offset = e_end;
    }
    fetched_bytes = r.next_offset - gap;
    MaybeEvict();
    break;
  }

  r.outcome = !upstream        ? Outcome::kHit
              : head_bytes > 0 ? Outcome::kPartial
                               : Outcome::kMiss;
  (r.outcome == Outcome::kHit       ? k->hits
   : r.outcome == Outcome::kPartial ? k->partial_hits
                                    : k->misses)
      .Add(1);
  k->bytes_from_cache.Add(r.next_offset - offset - fetched_bytes);
  k->bytes_from_upstream.Add(fetched_bytes);
  return r;
}

ExtentCache::Dropped ExtentCache::Impl::InvalidateKeys(
    const std::vector<KeyState*>& keys, uint64_t offset, uint64_t length) {
  const uint64_t end = length == 0 ? kMaxU64 : SatAdd(offset, length);
  Dropped total;
  for (KeyState* k : keys) {
    IntervalMap doomed(
        std::less<uint64_t>(),
        CountingAllocator<std::pair<const uint64_t, Interval>>(&k->mem));
    {
      sync::MutexLock l(&k->mu);
      k->invalidations.Add(1);
      for (Inflight& f : k->inflight) {
        if (end > f.start) {
          f.poison_from = std::min(f.poison_from, std::max(offset, f.start));
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
  const int64_t limit = static_cast<int64_t>(std::min<uint64_t>(
      options_.memory_limit_bytes, std::numeric_limits<int64_t>::max()));
  if (total_mem_.load(std::memory_order_relaxed) <= limit) return;
  sync::MutexLock evict_lock(&evict_mu_);
  const int64_t low_water = limit - limit / 8;
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
    EvictPass(keys, now, ages[want - 1]);
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
  c.coalesced_waits = k.coalesced_waits.Get();
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
    : options_(std::move(options)), impl_(std::make_unique<Impl>(options_)) {}

ExtentCache::~ExtentCache() = default;

LookupResult ExtentCache::Lookup(const CacheKey& key, uint64_t offset,
                                 uint64_t length, size_t max_extents,
                                 bool count) {
  return impl_->Lookup(key, offset, length, max_extents, count);
}

absl::StatusOr<LookupResult> ExtentCache::Get(const CacheKey& key,
                                              uint64_t export_size,
                                              uint64_t offset, uint64_t length,
                                              size_t max_extents, Fetcher fetch,
                                              absl::Time deadline) {
  return impl_->Get(key, export_size, offset, length, max_extents, fetch,
                    deadline);
}

ExtentCache::Dropped ExtentCache::Invalidate(const CacheKey& key,
                                             uint64_t offset, uint64_t length) {
  KeyState* k = impl_->Find(key);
  if (k == nullptr) return Dropped{};
  return impl_->InvalidateKeys({k}, offset, length);
}

ExtentCache::Dropped ExtentCache::InvalidateExportRange(
    const std::string& export_name, uint64_t offset, uint64_t length) {
  return impl_->InvalidateKeys(impl_->KeysOf(&export_name), offset, length);
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
