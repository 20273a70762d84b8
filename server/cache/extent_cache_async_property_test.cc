// server/cache/extent_cache_async_property_test.cc — randomized sequences of
// the asynchronous path against a reference model. The fake upstream holds
// every fetch's completion in a queue; the test delivers them later, in
// random order, answered either from the disk as it was when the fetch was
// issued (a reply still on the wire) or as it is at delivery, sometimes with
// an error, short (a window-limited upstream), or longer than asked. Writes
// (the disk changes, then InvalidateExportRange) land between steps and
// inside fetcher calls (while Get() has registered fetches and holds no
// lock), so fetches are in flight across writes; read-ahead runs for scans
// and long requests; the memory bound is tiny or large.
//
// Checks (the correctness rule: every answer is one the upstream gives
// now):
// * every Lookup() and every whole-disk scan equals the disk now, so
//   nothing fetched before a write is served for the written range after
//   it (the poison rule);
// * every unit a Get() returns equals the disk at some moment during that
//   Get() (a write that lands inside it may leave it the older answer;
//   a Get() that starts after a write never sees the old one);
// * the memory bound holds after every step; upstream_calls equals the
//   fetcher's calls.
// Steps run on one thread, chosen by the seed, except that a patient
// waiter's reply is delivered from a second thread while the waiter waits
// (the only way a waiter reads a fetch record). Deadlines (absl::Now()) and
// that thread's timing may differ between runs on a loaded machine; every
// outcome of them is accepted. The seed is printed; reproduce one with
// --gtest_random_seed=N (it replaces the default seed list).
// Mutations this catches: not poisoning fetches in flight at an
// invalidation; handing waiters the poisoned part of a fetch record.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/common/mutex.h"
#include "tests/testing/cache_property_model.h"
#include "tests/testing/eventually.h"
#include "tests/testing/random_answer.h"

namespace blockmeta {
namespace {

constexpr int kSeeds = 16;
constexpr int kSteps = 2500;
constexpr int kKeyCount = testing::kPropertyKeys;

const CacheKey& kXDirty = testing::PropertyKey(1);
const CacheKey* const kKeys[kKeyCount] = {&testing::PropertyKey(0), &kXDirty,
                                          &testing::PropertyKey(2)};

// A Get() that has to wait for the upstream gives up after this; the fetch
// runs on (detached) and is delivered by a later step.
constexpr absl::Duration kPatience = absl::Microseconds(200);

using Truth = std::vector<uint32_t>;  // flags per unit

class AsyncPropertyRun {
 public:
  explicit AsyncPropertyRun(uint64_t seed) : rng_(seed) {
    testing::RandomDisk d = testing::MakeRandomDisk(
        16, 400, [this](uint64_t n) { return Rand(n); });
    unit_ = d.unit;
    units_ = d.units;
    size_ = d.size;
    for (int k = 0; k < kKeyCount; ++k) truth_[k] = std::move(d.truth[k]);
    history_.push_back({truth_[0], truth_[1], truth_[2]});
    ExtentCache::Options o;
    switch (Rand(3)) {
      case 0:
        o.memory_limit_bytes = 256 + Rand(2048);  // a few intervals
        break;
      case 1:
        o.memory_limit_bytes = 8 * 1024;
        break;
      default:
        o.memory_limit_bytes = 256 << 20;
        break;
    }
    // Windows of a few units make scans and long requests span many
    // windows, so read-ahead runs.
    o.fetch_window_bytes =
        Rand(4) == 0 ? 1 + Rand(unit_ * 2) : unit_ * (1 + Rand(40));
    o.read_ahead_windows = static_cast<uint32_t>(Rand(3) == 0 ? 0 : Rand(9));
    // A window-limited upstream answers at most this much (0 = no limit).
    limit_ = Rand(2) ? 0 : unit_ * (1 + Rand(20));
    options_ = o;
    cache_ = std::make_unique<ExtentCache>(o);
    for (int k = 0; k < kKeyCount; ++k) {
      fetchers_[k] = [this, k](uint64_t off, uint64_t len, FetchDone done) {
        OnFetch(k, off, len, std::move(done));
      };
    }
  }

  ~AsyncPropertyRun() {
    // Completions may issue read-ahead; deliver until none is left, then
    // let the cache go (the fetchers point at this object).
    DrainAll();
    cache_.reset();
  }

  void Run(int steps) {
    for (step_ = 0; step_ < steps && !::testing::Test::HasFatalFailure();
         ++step_) {
      const uint64_t r = Rand(100);
      if (r < 30) {
        DoGet();
      } else if (r < 40) {
        if (Rand(2) == 0) {
          DoScanStep();
        } else {
          DoShimScanStep();
        }
      } else if (r < 62 || r >= 96) {
        DoDeliver();
      } else if (r < 74) {
        DoWrite();
      } else if (r < 78) {
        DoClearBitmap();
      } else if (r < 90) {
        DoLookup();
      } else if (r < 92) {
        DoForget();
      } else if (r < 93) {
        CheckWholeDisk();
      } else {
        DoWaiterGet();
      }
      ASSERT_LE(cache_->Counters().memory_bytes, options_.memory_limit_bytes)
          << "memory bound " << Where();
    }
    if (::testing::Test::HasFatalFailure()) return;
    DrainAll();
    CheckWholeDisk();
    EXPECT_EQ(cache_->Counters().upstream_calls, fetcher_calls_) << Where();
    EXPECT_EQ(pending_.size(), 0u);
  }

  uint64_t fetcher_calls() const { return fetcher_calls_; }
  uint64_t delivered_stale() const { return delivered_stale_; }
  size_t max_pending() const { return max_pending_seen_; }
  uint64_t waiter_gets() const { return waiter_gets_; }
  uint64_t waiter_answers() const { return waiter_answers_; }
  CacheCounters counters() const { return cache_->Counters(); }

 private:
  struct Pending {
    int k;
    uint64_t offset;
    uint64_t length;
    // The answer read when the fetch was issued, delivered later; empty =
    // read the disk at delivery.
    std::optional<ExtentList> early;
    size_t version;  // history_ index when issued
    FetchDone done;
  };

  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  uint32_t RandomFlags(int k) {
    return testing::RandomUnitFlags(k, [this](uint64_t n) { return Rand(n); });
  }
  std::string Where() const {
    return absl::StrCat("step ", step_, " unit ", unit_, " size ", size_,
                        " window ", options_.fetch_window_bytes, " ra ",
                        options_.read_ahead_windows, " limit ", limit_, " mem ",
                        options_.memory_limit_bytes, " pending ",
                        pending_.size());
  }

  // The upstream's answer for [off, off + len) of key k from `truth`:
  // random lengths (exact, short, window-limited, longer, past the export
  // end with garbage the cache must clip), random splits.
  ExtentList Answer(uint64_t off, uint64_t len, const Truth& truth) {
    return testing::RandomUpstreamAnswer(
        off, len, truth, unit_, size_, limit_,
        [this](uint64_t n) { return Rand(n); });
  }

  // The AsyncFetcher of key k. Calls made from inside a delivery or from
  // this fetcher's own chaos are only queued (bounded recursion).
  void OnFetch(int k, uint64_t off, uint64_t len, FetchDone done) {
    if (side_mode_) {
      // DoWaiterGet() runs: any thread, no randomness; merged afterwards.
      sync::MutexLock l(&side_mu_);
      side_.push_back(Pending{k, off, len, std::nullopt, history_.size() - 1,
                              std::move(done)});
      return;
    }
    ++fetcher_calls_;
    EXPECT_LT(off, size_) << Where();
    EXPECT_LE(off + len, size_) << "fetch past the export end " << Where();
    EXPECT_GT(len, 0u) << Where();
    Pending p{k, off, len, std::nullopt, history_.size() - 1, std::move(done)};
    if (Rand(2)) p.early = Answer(off, len, truth_[k]);
    pending_.push_back(std::move(p));
    max_pending_seen_ = std::max(max_pending_seen_, pending_.size());
    if (depth_ > 0) return;
    ++depth_;
    // While Get() is between registering and awaiting its fetches: writes
    // and deliveries (this fetch's own, before returning, or others').
    const uint64_t chaos = Rand(10);
    if (chaos < 3) {
      Deliver(pending_.size() - 1);
    } else if (chaos < 4) {
      Deliver(Rand(pending_.size()));
    } else if (chaos < 6) {
      // A stale reply (read before a later write) lands while this Get()
      // may be waiting for it: waiters must take only its unpoisoned part.
      DeliverStale();
    } else if (chaos < 8) {
      DoWrite();
    }
    --depth_;
  }

  // Delivers the i-th queued completion.
  void Deliver(size_t i) {
    if (i >= pending_.size()) return;
    Pending p = std::move(pending_[i]);
    pending_.erase(pending_.begin() + static_cast<ptrdiff_t>(i));
    ++depth_;
    const uint64_t mode = Rand(100);
    if (mode < 6) {
      std::move(p.done)(absl::UnavailableError("injected"));
    } else if (mode < 8) {
      std::move(p.done)(ExtentList{});  // malformed: nothing
    } else if (p.early.has_value()) {
      if (p.version + 1 != history_.size()) ++delivered_stale_;
      std::move(p.done)(*std::move(p.early));
    } else {
      std::move(p.done)(Answer(p.offset, p.length, truth_[p.k]));
    }
    --depth_;
  }

  // Delivers the oldest queued completion read before the latest write
  // (any, if none).
  void DeliverStale() {
    for (size_t i = 0; i < pending_.size(); ++i) {
      if (pending_[i].early.has_value() &&
          pending_[i].version + 1 != history_.size()) {
        Deliver(i);
        return;
      }
    }
    if (!pending_.empty()) Deliver(0);
  }

  // A patient Get() that waits for a fetch already in flight while the
  // fetch's (often stale) reply is delivered on a second thread: the
  // waiter reads the answer from the fetch record and must take only what
  // no write since the fetch was issued touched. The fetcher calls made
  // meanwhile (top-ups, a retry) are queued and merged in a fixed order;
  // the waiter gives up after a short deadline when it has to fetch itself.
  void DoWaiterGet() {
    if (pending_.empty()) return;
    // Prefer a reply read before the latest write.
    size_t pick = Rand(pending_.size());
    for (size_t i = 0; i < pending_.size(); ++i) {
      const size_t j = (pick + i) % pending_.size();
      if (pending_[j].early.has_value() &&
          pending_[j].version + 1 != history_.size()) {
        pick = j;
        break;
      }
    }
    const int k = pending_[pick].k;
    const uint64_t off = pending_[pick].offset + Rand(pending_[pick].length);
    if (cache_->Lookup(*kKeys[k], off, 1, 0).outcome != Outcome::kMiss) return;
    // The record the waiter finds: of the key's fetches covering off, the
    // one with the greatest start (the first issued among equals).
    size_t f = pending_.size();
    for (size_t i = 0; i < pending_.size(); ++i) {
      const Pending& p = pending_[i];
      if (p.k == k && p.offset <= off && off < p.offset + p.length &&
          (f == pending_.size() || p.offset > pending_[f].offset)) {
        f = i;
      }
    }
    Pending target = std::move(pending_[f]);
    pending_.erase(pending_.begin() + static_cast<ptrdiff_t>(f));
    absl::StatusOr<ExtentList> reply =
        target.early.has_value()
            ? absl::StatusOr<ExtentList>(*std::move(target.early))
            : absl::StatusOr<ExtentList>(
                  Answer(target.offset, target.length, truth_[target.k]));
    if (Rand(10) == 0) reply = absl::UnavailableError("injected");
    const uint64_t len = 1 + Rand(Rand(2) ? unit_ * 4 : size_);
    const size_t max_extents = Rand(3) == 0 ? 1 + Rand(4) : 0;
    const uint64_t waits_before = cache_->Counters(*kKeys[k]).coalesced_waits;

    side_mode_ = true;
    std::atomic<bool> returned{false};
    std::thread deliverer([&] {
      // Once the waiter has found the record (or returned), reply.
      // Bounded: reply anyway after 10 s.
      testing::Eventually(
          [&] {
            return returned.load() ||
                   cache_->Counters(*kKeys[k]).coalesced_waits != waits_before;
          },
          absl::Seconds(10), absl::Microseconds(20));
      std::move(target.done)(std::move(reply));
    });
    const size_t v = history_.size() - 1;
    const absl::StatusOr<LookupResult> r =
        cache_->Get(*kKeys[k], size_, off, len, max_extents, fetchers_[k],
                    absl::Now() + absl::Milliseconds(4));
    returned = true;
    deliverer.join();
    side_mode_ = false;
    {
      sync::MutexLock l(&side_mu_);
      std::sort(side_.begin(), side_.end(),
                [](const Pending& a, const Pending& b) {
                  return std::tie(a.k, a.offset, a.length) <
                         std::tie(b.k, b.offset, b.length);
                });
      for (Pending& p : side_) {
        ++fetcher_calls_;
        pending_.push_back(std::move(p));
      }
      side_.clear();
    }
    ++waiter_gets_;
    if (!r.ok()) return;
    ++waiter_answers_;
    CheckGet(k, off, len, max_extents, *r, v, v);
  }

  void DoDeliver() {
    if (pending_.empty()) return;
    const int n = 1 + static_cast<int>(Rand(Rand(4) == 0 ? 8 : 2));
    for (int i = 0; i < n && !pending_.empty(); ++i) {
      Deliver(Rand(pending_.size()));
    }
  }

  void DrainAll() {
    for (int guard = 0; !pending_.empty() && guard < 100000; ++guard) {
      Deliver(Rand(pending_.size()));
    }
  }

  // Checks a Get() result: contiguous from off, clipped to the request,
  // each unit equal to the disk at some version in [v0, v1].
  void CheckGet(int k, uint64_t off, uint64_t len, size_t max_extents,
                const LookupResult& r, size_t v0, size_t v1) {
    const uint64_t end = std::min(off + len, size_);
    uint64_t pos = off;
    ASSERT_FALSE(r.extents.empty()) << Where();
    for (size_t i = 0; i < r.extents.size(); ++i) {
      const Extent& e = r.extents[i];
      ASSERT_EQ(e.offset, pos) << "not contiguous " << Where();
      ASSERT_GT(e.length, 0u) << Where();
      ASSERT_LE(e.end(), end) << "past the request/export " << Where();
      if (i > 0) {
        ASSERT_NE(e.flags, r.extents[i - 1].flags)
            << "unmerged neighbours " << Where();
      }
      for (uint64_t u = e.offset / unit_; u * unit_ < e.end(); ++u) {
        bool seen = false;
        for (size_t v = v0; v <= v1 && !seen; ++v) {
          seen = history_[v][k][u] == e.flags;
        }
        ASSERT_TRUE(seen) << "Get served " << e << " key " << k << " unit " << u
                          << ": the disk there is " << truth_[k][u]
                          << " now, versions " << v0 << ".." << v1 << " "
                          << Where();
      }
      pos = e.end();
    }
    ASSERT_EQ(r.next_offset, pos) << Where();
    if (max_extents != 0) {
      ASSERT_LE(r.extents.size(), max_extents) << Where();
    }
  }

  // A Lookup() (or any answer from the cache alone) equals the disk now.
  void CheckNow(int k, uint64_t off, uint64_t len, const LookupResult& r,
                const char* what) {
    ASSERT_TRUE(testing::MatchesTruth(off, len, size_, unit_, r, truth_[k]))
        << what << " key " << k << ": not what the upstream reports now "
        << Where();
  }

  void GetAndCheck(int k, uint64_t off, uint64_t len, size_t max_extents,
                   absl::StatusOr<LookupResult>* out) {
    const size_t v0 = history_.size() - 1;
    *out = cache_->Get(*kKeys[k], size_, off, len, max_extents, fetchers_[k],
                       absl::Now() + kPatience);
    const size_t v1 = history_.size() - 1;
    if (!out->ok()) {
      const absl::StatusCode c = out->status().code();
      ASSERT_TRUE(c == absl::StatusCode::kDeadlineExceeded ||
                  c == absl::StatusCode::kUnavailable ||
                  c == absl::StatusCode::kInternal)
          << out->status() << " " << Where();
      return;
    }
    CheckGet(k, off, len, max_extents, **out, v0, v1);
  }

  void DoGet() {
    const int k = static_cast<int>(Rand(kKeyCount));
    const uint64_t off = Rand(size_);
    uint64_t len;
    switch (Rand(3)) {
      case 0:
        len = 1 + Rand(unit_ * 3);
        break;
      case 1:
        len = 1 + Rand(size_);
        break;
      default:
        len = size_ * 2;  // a long request: parallel windows
        break;
    }
    const size_t max_extents = Rand(3) == 0 ? 1 + Rand(4) : 0;
    absl::StatusOr<LookupResult> r;
    GetAndCheck(k, off, len, max_extents, &r);
  }

  // A sequential scan per key (qemu-img map style), so window-limited
  // read-ahead runs form and are read.
  void DoScanStep() {
    const int k = static_cast<int>(Rand(kKeyCount));
    if (scan_pos_[k] >= size_) scan_pos_[k] = Rand(4) == 0 ? Rand(size_) : 0;
    absl::StatusOr<LookupResult> r;
    const size_t max_extents = Rand(2) ? 1 : 0;
    GetAndCheck(k, scan_pos_[k], size_ - scan_pos_[k], max_extents, &r);
    if (r.ok()) scan_pos_[k] = r->next_offset;
  }

  // The NBD shim's REQ_ONE walk: a warm step is answered by Lookup() and
  // counted by Record() (which follows the walk and may issue read-ahead),
  // a cold one by Get(). Walk read-ahead then runs for these scans too.
  void DoShimScanStep() {
    const int k = static_cast<int>(Rand(kKeyCount));
    if (shim_pos_[k] >= size_) shim_pos_[k] = Rand(4) == 0 ? Rand(size_) : 0;
    const uint64_t pos = shim_pos_[k];
    const LookupResult hit = cache_->Lookup(*kKeys[k], pos, size_ - pos, 1);
    if (hit.outcome == Outcome::kHit) {
      CheckNow(k, pos, size_ - pos, hit, "shim walk");
      cache_->Record(*kKeys[k], pos, hit);
      shim_pos_[k] = hit.next_offset;
      return;
    }
    absl::StatusOr<LookupResult> r;
    GetAndCheck(k, pos, size_ - pos, 1, &r);
    if (r.ok()) shim_pos_[k] = r->next_offset;
  }

  void DoLookup() {
    const int k = static_cast<int>(Rand(kKeyCount));
    const uint64_t off = Rand(size_ + unit_);
    const uint64_t len = 1 + Rand(Rand(2) ? unit_ * 4 : size_ * 2);
    const LookupResult r = cache_->Lookup(*kKeys[k], off, len, 0);
    CheckNow(k, off, len, r, "Lookup");
    // Recording may top up read-ahead, whose fetcher call may write: check
    // first.
    if (Rand(2) == 0) cache_->Record(*kKeys[k], off, r);
  }

  // A byte range covering units [ua, ub), sometimes wider or to the end.
  std::pair<uint64_t, uint64_t> CoveringRange(uint64_t ua, uint64_t ub) {
    return testing::CoveringRange(ua, ub, unit_, /*to_end_one_in=*/10,
                                  [this](uint64_t n) { return Rand(n); });
  }

  void Commit() { history_.push_back({truth_[0], truth_[1], truth_[2]}); }

  // A write: the export's allocation changes and (export x) its bitmap
  // turns dirty; then every context of the export is invalidated.
  void DoWrite() {
    const testing::ModelChange c =
        testing::ApplyModelWrite(truth_, units_, /*long_run=*/60,
                                 [this](uint64_t n) { return Rand(n); });
    Commit();
    auto [a, l] = CoveringRange(c.ua, c.ub);
    cache_->InvalidateExportRange(c.export_name(), a, l);
  }

  // The bitmap is cleared (after a backup): one context changes.
  void DoClearBitmap() {
    const testing::ModelChange c = testing::ApplyModelBitmapClear(
        truth_, units_, [this](uint64_t n) { return Rand(n); });
    Commit();
    auto [a, l] = CoveringRange(c.ua, c.ub);
    cache_->Invalidate(kXDirty, a, l);
  }

  // Forgetting without a change (InvalidateCache RPC, export reconnect).
  void DoForget() {
    switch (Rand(3)) {
      case 0:
        cache_->Invalidate(*kKeys[Rand(kKeyCount)], Rand(size_), Rand(size_));
        break;
      case 1:
        cache_->InvalidateExport(Rand(2) ? "x" : "y");
        break;
      default:
        cache_->InvalidateAll();
        break;
    }
  }

  void CheckWholeDisk() {
    for (int k = 0; k < kKeyCount; ++k) {
      for (uint64_t pos = 0; pos < size_;) {
        const LookupResult r = cache_->Lookup(*kKeys[k], pos, size_, 0);
        CheckNow(k, pos, size_, r, "scan");
        if (::testing::Test::HasFatalFailure()) return;
        pos = r.next_offset == pos ? pos + 1 + Rand(unit_) : r.next_offset;
      }
    }
  }

  std::mt19937_64 rng_;
  uint64_t unit_ = 1;
  uint64_t units_ = 1;
  uint64_t size_ = 1;
  uint64_t limit_ = 0;
  Truth truth_[kKeyCount];
  // The disk after every change; history_.back() is the disk now.
  std::vector<std::vector<Truth>> history_;
  ExtentCache::Options options_;
  std::unique_ptr<ExtentCache> cache_;
  AsyncFetcher fetchers_[kKeyCount];
  std::deque<Pending> pending_;
  uint64_t scan_pos_[kKeyCount] = {};
  uint64_t shim_pos_[kKeyCount] = {};
  int depth_ = 0;
  int step_ = 0;
  uint64_t fetcher_calls_ = 0;
  uint64_t delivered_stale_ = 0;
  size_t max_pending_seen_ = 0;
  uint64_t waiter_gets_ = 0;
  uint64_t waiter_answers_ = 0;
  // DoWaiterGet(): fetcher calls made while its two threads run.
  std::atomic<bool> side_mode_{false};
  sync::Mutex side_mu_;
  std::vector<Pending> side_ ABSL_GUARDED_BY(side_mu_);
};

TEST(ExtentCacheAsyncPropertyTest, RandomInterleavingsServeOnlyTheTruthNow) {
  std::vector<uint64_t> seeds;
  if (GTEST_FLAG_GET(random_seed) != 0) {
    seeds.push_back(static_cast<uint64_t>(GTEST_FLAG_GET(random_seed)));
  } else {
    for (uint64_t s = 1; s <= kSeeds; ++s) seeds.push_back(s);
  }
  uint64_t calls = 0;
  uint64_t stale = 0;
  uint64_t waiters = 0;
  uint64_t waiter_answers = 0;
  CacheCounters total;
  for (const uint64_t seed : seeds) {
    SCOPED_TRACE(absl::StrCat("seed ", seed,
                              " (rerun with --gtest_random_seed=", seed, ")"));
    std::cout << "seed " << seed << "\n";
    AsyncPropertyRun run(seed);
    run.Run(kSteps);
    if (::testing::Test::HasFatalFailure()) return;
    calls += run.fetcher_calls();
    waiters += run.waiter_gets();
    waiter_answers += run.waiter_answers();
    stale += run.delivered_stale();
    total += run.counters();
  }
  std::cout << "fetches " << calls << ", delivered after a write " << stale
            << ", stale fills dropped " << total.stale_fills_dropped
            << ", read-ahead issued " << total.read_ahead_issued
            << ", coalesced waits " << total.coalesced_waits
            << ", detached waits " << total.detached_waits << ", evictions "
            << total.evictions << ", patient waiters " << waiters
            << " (answered " << waiter_answers << ")\n";
  // The interleavings this test is for happened.
  if (seeds.size() > 1) {
    EXPECT_GT(stale, 0u);
    EXPECT_GT(total.stale_fills_dropped, 0u);
    EXPECT_GT(total.read_ahead_issued, 0u);
    EXPECT_GT(total.coalesced_waits, 0u);
    EXPECT_GT(total.detached_waits, 0u);
    EXPECT_GT(total.evictions, 0u);
    EXPECT_GT(waiter_answers, 0u);
  }
}

}  // namespace
}  // namespace blockmeta
