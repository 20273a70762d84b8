// server/cache/extent_cache_test.cc — unit tests of ExtentCache: one test
// per behaviour of the contract in extent_cache.h (partial hits, windows,
// long/short/malformed answers, clipping, merging, key isolation, TTL,
// eviction, counters, errors, deadlines, single-flight, and the
// invalidation-during-fetch race). Fetchers count their calls, as nbdkit's
// test-cacheextents.sh counts backend calls.
#include "server/cache/extent_cache.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/mutex.h"
#include "tests/testing/eventually.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using ::testing::ElementsAre;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

const CacheKey kA{"a", "base:allocation"};
const CacheKey kADirty{"a", "qemu:dirty-bitmap:b1"};
const CacheKey kB{"b", "base:allocation"};

absl::Time Later() { return absl::Now() + absl::Seconds(30); }

// A disk whose status is a list of (end, flags) runs; answers exactly the
// window asked (or `answer_len` bytes when set), recording every call.
class FakeDisk {
 public:
  struct Call {
    uint64_t offset;
    uint64_t length;
  };
  // runs: {end, flags}, increasing ends; the last end is the disk size.
  explicit FakeDisk(std::vector<std::pair<uint64_t, uint32_t>> runs)
      : runs_(std::move(runs)) {}

  uint32_t FlagsAt(uint64_t off) const {
    for (const auto& [end, flags] : runs_) {
      if (off < end) return flags;
    }
    return 0;
  }
  uint64_t size() const { return runs_.back().first; }

  // True status of [offset, offset + len), split at run boundaries.
  ExtentList Truth(uint64_t offset, uint64_t len) const {
    ExtentList out;
    uint64_t pos = offset;
    const uint64_t end = offset + len;
    for (const auto& [run_end, flags] : runs_) {
      if (pos >= end) break;
      if (run_end <= pos) continue;
      const uint64_t e = std::min(run_end, end);
      out.push_back(Extent{pos, e - pos, flags});
      pos = e;
    }
    return out;
  }

  absl::StatusOr<ExtentList> operator()(uint64_t offset, uint64_t length,
                                        absl::Time) {
    calls.push_back(Call{offset, length});
    const uint64_t len = answer_len ? answer_len : length;
    return Truth(offset, std::min(len, size() - offset));
  }

  std::vector<std::pair<uint64_t, uint32_t>> runs_;
  std::vector<Call> calls;
  uint64_t answer_len = 0;
};

ExtentCache::Options SmallWindow(uint64_t window) {
  ExtentCache::Options o;
  o.fetch_window_bytes = window;
  return o;
}

TEST(ExtentCacheTest, MissThenHitServedFromCache) {
  ExtentCache cache(SmallWindow(64 * kKiB));
  FakeDisk disk({{16 * kKiB, 0}, {64 * kKiB, kStateHole | kStateZero}});
  auto r = cache.Get(kA, disk.size(), 0, 32 * kKiB, 0, std::ref(disk), Later());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->outcome, Outcome::kMiss);
  EXPECT_THAT(r->extents, ElementsAre(Extent{0, 16 * kKiB, 0},
                                      Extent{16 * kKiB, 16 * kKiB, 3}));
  EXPECT_EQ(r->next_offset, 32 * kKiB);
  ASSERT_EQ(disk.calls.size(), 1u);
  EXPECT_EQ(disk.calls[0].offset, 0u);
  EXPECT_EQ(disk.calls[0].length, 64 * kKiB);

  // The window answered more than asked: all of it is served from cache.
  r = cache.Get(kA, disk.size(), 8 * kKiB, 56 * kKiB, 0, std::ref(disk),
                Later());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->outcome, Outcome::kHit);
  EXPECT_THAT(r->extents, ElementsAre(Extent{8 * kKiB, 8 * kKiB, 0},
                                      Extent{16 * kKiB, 48 * kKiB, 3}));
  EXPECT_EQ(disk.calls.size(), 1u);

  const CacheCounters c = cache.Counters(kA);
  EXPECT_EQ(c.misses, 1u);
  EXPECT_EQ(c.hits, 1u);
  EXPECT_EQ(c.partial_hits, 0u);
  EXPECT_EQ(c.upstream_calls, 1u);
  EXPECT_EQ(c.bytes_from_upstream, 32 * kKiB);
  EXPECT_EQ(c.bytes_from_cache, 56 * kKiB);
  EXPECT_EQ(c.entries, 2u);
  EXPECT_GT(c.memory_bytes, 0u);
}

TEST(ExtentCacheTest, PartialHitFetchesOnlyTheGap) {
  ExtentCache cache(SmallWindow(4 * kKiB));
  FakeDisk disk({{6 * kKiB, kStateHole}, {1 * kMiB, 0}});
  ASSERT_TRUE(
      cache.Get(kA, disk.size(), 0, 4 * kKiB, 0, std::ref(disk), Later()).ok());
  ASSERT_EQ(disk.calls.size(), 1u);
  auto r = cache.Get(kA, disk.size(), 1 * kKiB, 15 * kKiB, 0, std::ref(disk),
                     Later());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->outcome, Outcome::kPartial);
  ASSERT_EQ(disk.calls.size(), 2u);
  EXPECT_EQ(disk.calls[1].offset, 4 * kKiB);   // only the gap
  EXPECT_EQ(disk.calls[1].length, 12 * kKiB);  // at least to request end
  // The cached head and the fetched hole merge in the answer.
  EXPECT_THAT(r->extents, ElementsAre(Extent{1 * kKiB, 5 * kKiB, kStateHole},
                                      Extent{6 * kKiB, 10 * kKiB, 0}));
  // And in the cache.
  LookupResult l = cache.Lookup(kA, 0, 16 * kKiB, 0);
  EXPECT_THAT(l.extents, ElementsAre(Extent{0, 6 * kKiB, kStateHole},
                                     Extent{6 * kKiB, 10 * kKiB, 0}));
  EXPECT_EQ(cache.Counters(kA).entries, 2u);
  EXPECT_EQ(cache.Counters(kA).bytes_from_cache, 3 * kKiB);
  EXPECT_EQ(cache.Counters(kA).bytes_from_upstream, 4 * kKiB + 12 * kKiB);
}

TEST(ExtentCacheTest, WindowIsClippedToExportEndAndProtocolLimit) {
  ExtentCache cache(SmallWindow(8 * kGiB));
  FakeDisk disk({{16 * kGiB, 0}});
  disk.answer_len = 4096;
  ASSERT_TRUE(
      cache.Get(kA, disk.size(), 0, 4096, 0, std::ref(disk), Later()).ok());
  ASSERT_TRUE(cache
                  .Get(kA, disk.size(), disk.size() - 8192, 100, 0,
                       std::ref(disk), Later())
                  .ok());
  ASSERT_EQ(disk.calls.size(), 2u);
  EXPECT_EQ(disk.calls[0].length, kMaxNbdRequestLength);
  EXPECT_EQ(disk.calls[1].length, 8192u);
}

TEST(ExtentCacheTest, ShortAnswerStopsEarlyAndNextCallContinues) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk disk({{1 * kMiB, 0}});
  disk.answer_len = 3000;  // not even a multiple of 512
  auto r = cache.Get(kA, disk.size(), 0, 8192, 0, std::ref(disk), Later());
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(r->extents, ElementsAre(Extent{0, 3000, 0}));
  EXPECT_EQ(r->next_offset, 3000u);
  r = cache.Get(kA, disk.size(), 0, 8192, 0, std::ref(disk), Later());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->outcome, Outcome::kPartial);
  EXPECT_THAT(r->extents, ElementsAre(Extent{0, 6000, 0}));
  ASSERT_EQ(disk.calls.size(), 2u);
  EXPECT_EQ(disk.calls[1].offset, 3000u);
  EXPECT_EQ(cache.Counters(kA).entries, 1u);  // merged
}

TEST(ExtentCacheTest, LongAnswerIsKeptAndClippedToExportSize) {
  ExtentCache cache(SmallWindow(4096));
  const uint64_t size = 10000;
  int calls = 0;
  auto fetch = [&](uint64_t off, uint64_t len,
                   absl::Time) -> absl::StatusOr<ExtentList> {
    ++calls;
    EXPECT_EQ(off, 0u);
    EXPECT_EQ(len, 4096u);
    // Past the request and past the export end.
    return ExtentList{{0, 5000, 0}, {5000, 6000, kStateHole}};
  };
  auto r = cache.Get(kA, size, 0, 100, 0, fetch, Later());
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(r->extents, ElementsAre(Extent{0, 100, 0}));
  LookupResult l = cache.Lookup(kA, 0, kMaxNbdRequestLength, 0);
  EXPECT_THAT(l.extents,
              ElementsAre(Extent{0, 5000, 0}, Extent{5000, 5000, kStateHole}));
  EXPECT_EQ(l.next_offset, size);
  r = cache.Get(kA, size, 9000, 5000, 0, fetch, Later());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->outcome, Outcome::kHit);
  EXPECT_THAT(r->extents, ElementsAre(Extent{9000, 1000, kStateHole}));
  EXPECT_EQ(calls, 1);
}

TEST(ExtentCacheTest, AdjacentEqualExtentsAreMerged) {
  ExtentCache cache(SmallWindow(4096));
  auto fetch = [&](uint64_t off, uint64_t,
                   absl::Time) -> absl::StatusOr<ExtentList> {
    // Three pieces; the first two have equal flags.
    return ExtentList{
        {off, 1024, 0}, {off + 1024, 1024, 0}, {off + 2048, 2048, kStateHole}};
  };
  auto r = cache.Get(kA, 1 * kMiB, 0, 4096, 0, fetch, Later());
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(r->extents,
              ElementsAre(Extent{0, 2048, 0}, Extent{2048, 2048, 1}));
  EXPECT_EQ(cache.Counters(kA).entries, 2u);
  // A later fill that starts with a hole merges into the left neighbour.
  auto fetch_hole = [&](uint64_t off, uint64_t len,
                        absl::Time) -> absl::StatusOr<ExtentList> {
    return ExtentList{{off, len, kStateHole}};
  };
  ASSERT_TRUE(cache.Get(kA, 1 * kMiB, 4096, 4096, 0, fetch_hole, Later()).ok());
  EXPECT_EQ(cache.Counters(kA).entries, 2u);
  // And a fill before a known run merges into the right neighbour.
  cache.Invalidate(kA, 0, 2048);
  auto fetch_data = [&](uint64_t off, uint64_t,
                        absl::Time) -> absl::StatusOr<ExtentList> {
    return ExtentList{{off, 1024, 0}, {off + 1024, 1024, kStateHole}};
  };
  ASSERT_TRUE(cache.Get(kA, 1 * kMiB, 0, 100, 0, fetch_data, Later()).ok());
  LookupResult l = cache.Lookup(kA, 0, 1 * kMiB, 0);
  EXPECT_THAT(l.extents,
              ElementsAre(Extent{0, 1024, 0}, Extent{1024, 7168, 1}));
  EXPECT_EQ(cache.Counters(kA).entries, 2u);
}

TEST(ExtentCacheTest, KeysNeverSeeEachOthersExtents) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk a({{512, kStateHole}, {1 * kMiB, 0}});
  FakeDisk a_dirty({{1 * kMiB, kStateDirty}});
  FakeDisk b({{1 * kMiB, kStateHole | kStateZero}});
  ASSERT_TRUE(cache.Get(kA, a.size(), 0, 4096, 0, std::ref(a), Later()).ok());
  // Same offsets, other context of the same export, other export: each
  // misses and asks its own upstream.
  auto rd =
      cache.Get(kADirty, a.size(), 0, 4096, 0, std::ref(a_dirty), Later());
  auto rb = cache.Get(kB, b.size(), 0, 4096, 0, std::ref(b), Later());
  ASSERT_TRUE(rd.ok());
  ASSERT_TRUE(rb.ok());
  EXPECT_EQ(rd->outcome, Outcome::kMiss);
  EXPECT_EQ(rb->outcome, Outcome::kMiss);
  EXPECT_THAT(rd->extents, ElementsAre(Extent{0, 4096, kStateDirty}));
  EXPECT_THAT(rb->extents, ElementsAre(Extent{0, 4096, 3}));
  EXPECT_EQ(a.calls.size(), 1u);
  EXPECT_EQ(a_dirty.calls.size(), 1u);
  EXPECT_EQ(b.calls.size(), 1u);
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).extents[0].flags, kStateHole);
  // Lookup never creates a key; Record does.
  const LookupResult c_miss =
      cache.Lookup(CacheKey{"c", "base:allocation"}, 0, 4096, 0);
  cache.Record(CacheKey{"c", "base:allocation"}, 0, c_miss);
  EXPECT_EQ(c_miss.outcome, Outcome::kMiss);

  // A write to export a forgets both of its contexts, not export b: kA
  // rounded out to the bound its answer showed (flags change at 512),
  // kADirty (a uniform answer: no bound) whole.
  ExtentCache::Dropped d = cache.InvalidateExportRange("a", 1000, 10);
  EXPECT_EQ(d.extents, 2u);
  EXPECT_EQ(d.bytes, 512u + 1 * kMiB);  // [512, 1024) and all of kADirty
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).next_offset, 512u);
  EXPECT_EQ(cache.Lookup(kA, 1024, 4096, 0).outcome, Outcome::kHit);
  EXPECT_EQ(cache.Lookup(kADirty, 0, 4096, 0).next_offset, 0u);
  EXPECT_EQ(cache.Lookup(kB, 0, 4096, 0).next_offset, 4096u);
  // One context alone.
  cache.Invalidate(kADirty, 0, 0);
  EXPECT_EQ(cache.Lookup(kADirty, 0, 4096, 0).outcome, Outcome::kMiss);
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).outcome, Outcome::kPartial);
  // A whole export.
  cache.InvalidateExport("b");
  EXPECT_EQ(cache.Lookup(kB, 0, 4096, 0).outcome, Outcome::kMiss);
  EXPECT_EQ(cache.Lookup(kA, 0, 512, 0).outcome, Outcome::kHit);
  cache.InvalidateAll();
  EXPECT_EQ(cache.Counters().entries, 0u);
  EXPECT_EQ(cache.Counters().memory_bytes, 0u);
  EXPECT_THAT(cache.Keys(),
              ElementsAre(kA, kADirty, kB, CacheKey{"c", "base:allocation"}));
}

TEST(ExtentCacheTest, InvalidateSplitsAndReportsWhatWasDropped) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk disk({{100, 0}, {200, 1}, {300, 0}, {1000, 1}});
  ASSERT_TRUE(
      cache.Get(kA, disk.size(), 0, 1000, 0, std::ref(disk), Later()).ok());
  ExtentCache::Dropped d = cache.Invalidate(kA, 150, 100);  // cuts 2 runs
  EXPECT_EQ(d.extents, 2u);
  EXPECT_EQ(d.bytes, 100u);
  d = cache.Invalidate(kA, 400, 10);  // punches a hole inside one run
  EXPECT_EQ(d.extents, 1u);
  EXPECT_EQ(d.bytes, 10u);
  LookupResult l = cache.Lookup(kA, 0, 1000, 0);
  EXPECT_THAT(l.extents, ElementsAre(Extent{0, 100, 0}, Extent{100, 50, 1}));
  EXPECT_THAT(cache.Lookup(kA, 250, 1000, 0).extents,
              ElementsAre(Extent{250, 50, 0}, Extent{300, 100, 1}));
  EXPECT_THAT(cache.Lookup(kA, 405, 1000, 0).extents, ElementsAre());
  EXPECT_THAT(cache.Lookup(kA, 410, 1000, 0).extents,
              ElementsAre(Extent{410, 590, 1}));
  EXPECT_EQ(cache.Counters(kA).invalidations, 2u);
  EXPECT_EQ(cache.Counters(kA).entries, 5u);
  // Unknown keys are not created by invalidations.
  EXPECT_EQ(cache.Invalidate(kB, 0, 0).extents, 0u);
  EXPECT_THAT(cache.Keys(), ElementsAre(kA));
}

TEST(ExtentCacheTest, MaxExtentsLimitsTheAnswer) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk disk({{100, 0}, {200, 1}, {300, 0}, {1000, 1}});
  auto r = cache.Get(kA, disk.size(), 50, 1000, 2, std::ref(disk), Later());
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(r->extents, ElementsAre(Extent{50, 50, 0}, Extent{100, 100, 1}));
  EXPECT_EQ(r->next_offset, 200u);
  LookupResult l = cache.Lookup(kA, 50, 1000, 1);
  EXPECT_EQ(l.outcome, Outcome::kHit);
  EXPECT_THAT(l.extents, ElementsAre(Extent{50, 50, 0}));
}

TEST(ExtentCacheTest, ArgumentErrors) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk disk({{1000, 0}});
  EXPECT_THAT(cache.Get(kA, 1000, 0, 0, 0, std::ref(disk), Later()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(cache.Get(kA, 1000, 1000, 1, 0, std::ref(disk), Later()),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_TRUE(disk.calls.empty());
  // A range past the end is clipped.
  auto r = cache.Get(kA, 1000, 900, 5000, 0, std::ref(disk), Later());
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(r->extents, ElementsAre(Extent{900, 100, 0}));
}

TEST(ExtentCacheTest, UpstreamErrorsPropagateAndAreNotCached) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  int calls = 0;
  auto failing = [&](uint64_t, uint64_t,
                     absl::Time) -> absl::StatusOr<ExtentList> {
    ++calls;
    return absl::UnavailableError("upstream went away");
  };
  auto r = cache.Get(kA, 4096, 0, 4096, 0, failing, Later());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(r.status().message(), "upstream went away");
  r = cache.Get(kA, 4096, 0, 4096, 0, failing, Later());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(cache.Counters(kA).entries, 0u);
  // Also after a cached head.
  FakeDisk disk({{4096, 0}});
  disk.answer_len = 1024;
  ASSERT_TRUE(cache.Get(kA, 4096, 0, 100, 0, std::ref(disk), Later()).ok());
  r = cache.Get(kA, 4096, 0, 4096, 0, failing, Later());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable));
}

TEST(ExtentCacheTest, MalformedAnswersAreInternalErrorsAndNotCached) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  const std::vector<ExtentList> bad = {
      {},                                     // empty
      {{512, 512, 1}},                        // wrong start
      {{0, 512, 1}, {1024, 512, 1}},          // gap
      {{0, 512, 1}, {512, 0, 1}},             // zero length
      {{0, 512, 1}, {512, ~uint64_t{0}, 1}},  // overflow
  };
  for (const ExtentList& answer : bad) {
    auto fetch = [&](uint64_t, uint64_t,
                     absl::Time) -> absl::StatusOr<ExtentList> {
      return answer;
    };
    auto r = cache.Get(kA, 1 * kMiB, 0, 4096, 0, fetch, Later());
    EXPECT_THAT(r, StatusIs(absl::StatusCode::kInternal));
    EXPECT_THAT(std::string(r.status().message()),
                ::testing::HasSubstr("upstream block-status answer"));
    EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).outcome, Outcome::kMiss);
  }
  EXPECT_EQ(cache.Counters(kA).entries, 0u);
}

TEST(ExtentCacheTest, TtlExpiresIntervalsAndExportOverride) {
  sync::Mutex mu;
  absl::Time now = absl::FromUnixSeconds(1000000);
  ExtentCache::Options o = SmallWindow(1 * kMiB);
  o.ttl = absl::Seconds(10);
  o.clock = [&] {
    sync::MutexLock l(&mu);
    return now;
  };
  auto advance = [&](absl::Duration d) {
    sync::MutexLock l(&mu);
    now += d;
  };
  ExtentCache cache(o);
  FakeDisk disk({{4096, 0}});
  ASSERT_TRUE(cache.Get(kA, 4096, 0, 4096, 0, std::ref(disk), Later()).ok());
  ASSERT_TRUE(cache.Get(kB, 4096, 0, 4096, 0, std::ref(disk), Later()).ok());
  cache.SetExportTtl("b", absl::InfiniteDuration());
  advance(absl::Seconds(9));
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).outcome, Outcome::kHit);
  advance(absl::Seconds(1));
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).outcome, Outcome::kMiss);
  EXPECT_EQ(cache.Lookup(kB, 0, 4096, 0).outcome, Outcome::kHit);
  auto r = cache.Get(kA, 4096, 0, 4096, 0, std::ref(disk), Later());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->outcome, Outcome::kMiss);
  EXPECT_EQ(disk.calls.size(), 3u);
  EXPECT_EQ(cache.Counters(kA).entries, 1u);  // the expired one replaced
  // An override set before the key exists applies to it too.
  cache.SetExportTtl("c", absl::Seconds(1));
  const CacheKey kc{"c", "base:allocation"};
  ASSERT_TRUE(cache.Get(kc, 4096, 0, 4096, 0, std::ref(disk), Later()).ok());
  advance(absl::Seconds(1));
  EXPECT_EQ(cache.Lookup(kc, 0, 4096, 0).outcome, Outcome::kMiss);
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).outcome, Outcome::kHit);
}

// Fills `n` alternating-flag 512-byte intervals one Get at a time.
void FillAlternating(ExtentCache& cache, const CacheKey& key, uint64_t n,
                     uint64_t first = 0) {
  auto fetch = [](uint64_t off, uint64_t,
                  absl::Time) -> absl::StatusOr<ExtentList> {
    return ExtentList{{off, 512, static_cast<uint32_t>((off / 512) % 2)}};
  };
  for (uint64_t i = first; i < first + n; ++i) {
    ASSERT_TRUE(cache.Get(key, 1 * kGiB, i * 512, 512, 0, fetch, Later()).ok());
  }
}

TEST(ExtentCacheTest, EvictionKeepsMemoryUnderTheLimitAndPrefersLru) {
  ExtentCache::Options o = SmallWindow(512);
  o.memory_limit_bytes = 8 * kKiB;
  ExtentCache cache(o);
  // Warm up: fill one run and keep touching it while filling many more.
  FillAlternating(cache, kA, 1);
  for (uint64_t i = 1; i < 2000; ++i) {
    FillAlternating(cache, kA, 1, i);
    ASSERT_EQ(cache.Lookup(kA, 0, 512, 0).outcome, Outcome::kHit) << i;
    ASSERT_LE(cache.Counters().memory_bytes, o.memory_limit_bytes) << i;
  }
  const CacheCounters c = cache.Counters(kA);
  EXPECT_GT(c.evictions, 1000u);
  EXPECT_LT(c.entries, 400u);
  EXPECT_EQ(c.entries + c.evictions, 2000u);
  // The most recent fills survive, the oldest untouched ones do not.
  EXPECT_EQ(cache.Lookup(kA, 1999 * 512, 512, 0).outcome, Outcome::kHit);
  EXPECT_EQ(cache.Lookup(kA, 1 * 512, 512, 0).outcome, Outcome::kMiss);
  // Whatever survived is still the truth.
  for (uint64_t i = 0; i < 2000; ++i) {
    LookupResult l = cache.Lookup(kA, i * 512, 512, 0);
    for (const Extent& e : l.extents) {
      EXPECT_EQ(e.flags, (e.offset / 512) % 2);
    }
  }
}

TEST(ExtentCacheTest, EvictionIsGlobalAcrossKeys) {
  ExtentCache::Options o = SmallWindow(512);
  o.memory_limit_bytes = 16 * kKiB;
  ExtentCache cache(o);
  FillAlternating(cache, kA, 300);
  FillAlternating(cache, kB, 300);
  EXPECT_LE(cache.Counters().memory_bytes, o.memory_limit_bytes);
  // kA's intervals are older: they went first.
  EXPECT_GT(cache.Counters(kA).evictions, cache.Counters(kB).evictions);
  EXPECT_EQ(cache.Lookup(kB, 299 * 512, 512, 0).outcome, Outcome::kHit);
}

// A fetcher that blocks until released, then answers `flags` for the
// window; signals when it has been entered.
class BlockingFetcher {
 public:
  explicit BlockingFetcher(uint32_t flags) : flags_(flags) {}
  absl::StatusOr<ExtentList> operator()(uint64_t off, uint64_t len,
                                        absl::Time deadline) {
    calls_.fetch_add(1);
    entered_.Notify();
    if (!release_.WaitForNotificationWithDeadline(deadline)) {
      return absl::DeadlineExceededError("fake upstream timed out");
    }
    return ExtentList{{off, len, flags_}};
  }
  void WaitEntered() { entered_.WaitForNotification(); }
  void Release() { release_.Notify(); }
  int calls() const { return calls_.load(); }

 private:
  const uint32_t flags_;
  std::atomic<int> calls_{0};
  absl::Notification entered_;
  absl::Notification release_;
};

// Polls until pred() holds (no fixed sleeps); fails after 30 s.
template <typename Pred>
void WaitUntil(Pred pred) {
  ASSERT_TRUE(
      testing::Eventually(pred, absl::Seconds(30), absl::Milliseconds(1)))
      << "condition never became true";
}

TEST(ExtentCacheTest, InvalidationDuringFetchDropsTheStaleHole) {
  ExtentCache cache(SmallWindow(64 * kKiB));
  BlockingFetcher stale(kStateHole | kStateZero);
  absl::StatusOr<LookupResult> r;
  std::thread t([&] {
    r = cache.Get(kA, 1 * kMiB, 0, 4096, 0, std::ref(stale), Later());
  });
  stale.WaitEntered();
  // An invalidation lands inside the window while the upstream call is in
  // flight (one key, exact range: a write through InvalidateExportRange
  // would forget this key whole, as its bound is not known yet).
  cache.Invalidate(kA, 8192, 512);
  stale.Release();
  t.join();
  // The caller gets what it asked for (true when asked) ...
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(r->extents, ElementsAre(Extent{0, 4096, 3}));
  // ... but nothing from the invalidated byte on is cached; the head before
  // it is (no invalidation touched it).
  EXPECT_EQ(cache.Counters(kA).stale_fills_dropped, 1u);
  EXPECT_EQ(cache.Lookup(kA, 0, 64 * kKiB, 0).next_offset, 8192u);
  EXPECT_EQ(cache.Lookup(kA, 8192, 4096, 0).outcome, Outcome::kMiss);
  // The next Get asks the upstream again and sees the data.
  FakeDisk disk({{1 * kMiB, 0}});
  auto again = cache.Get(kA, 1 * kMiB, 8192, 4096, 0, std::ref(disk), Later());
  ASSERT_TRUE(again.ok());
  EXPECT_THAT(again->extents, ElementsAre(Extent{8192, 4096, 0}));
  EXPECT_EQ(disk.calls.size(), 1u);
}

TEST(ExtentCacheTest, InvalidationAtTheGapDropsTheWholeFill) {
  ExtentCache cache(SmallWindow(64 * kKiB));
  BlockingFetcher stale(kStateHole);
  absl::StatusOr<LookupResult> r;
  std::thread t([&] {
    r = cache.Get(kA, 1 * kMiB, 4096, 4096, 0, std::ref(stale), Later());
  });
  stale.WaitEntered();
  cache.Invalidate(kA, 0, 5000);  // starts before the gap, overlaps it
  stale.Release();
  t.join();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(cache.Lookup(kA, 4096, 4096, 0).outcome, Outcome::kMiss);
  EXPECT_EQ(cache.Counters(kA).entries, 0u);
  EXPECT_EQ(cache.Counters(kA).stale_fills_dropped, 1u);
  FakeDisk disk({{1 * kMiB, 0}});
  auto again = cache.Get(kA, 1 * kMiB, 4096, 4096, 0, std::ref(disk), Later());
  ASSERT_TRUE(again.ok());
  EXPECT_THAT(again->extents, ElementsAre(Extent{4096, 4096, 0}));
  EXPECT_EQ(disk.calls.size(), 1u);
}

TEST(ExtentCacheTest, WholeExportInvalidationDuringFetchDropsTheFill) {
  ExtentCache cache(SmallWindow(64 * kKiB));
  BlockingFetcher stale(kStateHole);
  std::thread t([&] {
    EXPECT_TRUE(
        cache.Get(kA, 1 * kMiB, 0, 4096, 0, std::ref(stale), Later()).ok());
  });
  stale.WaitEntered();
  cache.InvalidateExport("a");
  stale.Release();
  t.join();
  EXPECT_EQ(cache.Counters(kA).entries, 0u);
  EXPECT_EQ(cache.Counters(kA).stale_fills_dropped, 1u);
}

TEST(ExtentCacheTest, NonOverlappingInvalidationDoesNotDropTheFill) {
  ExtentCache cache(SmallWindow(64 * kKiB));
  BlockingFetcher fetch(kStateHole);
  std::thread t([&] {
    EXPECT_TRUE(
        cache.Get(kA, 1 * kMiB, 8192, 4096, 0, std::ref(fetch), Later()).ok());
  });
  fetch.WaitEntered();
  cache.Invalidate(kA, 0, 8192);           // ends where the gap starts
  cache.Invalidate(kADirty, 0, 0);         // other key (never created)
  cache.InvalidateExportRange("b", 0, 0);  // other export
  fetch.Release();
  t.join();
  EXPECT_EQ(cache.Counters(kA).stale_fills_dropped, 0u);
  EXPECT_EQ(cache.Lookup(kA, 8192, 64 * kKiB, 0).outcome, Outcome::kHit);
}

TEST(ExtentCacheTest, ConcurrentMissesMakeOneUpstreamCall) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  BlockingFetcher fetch(kStateHole);
  constexpr int kThreads = 8;
  std::vector<absl::StatusOr<LookupResult>> results(kThreads);
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    results[0] = cache.Get(kA, 1 * kMiB, 0, 4096, 0, std::ref(fetch), Later());
  });
  fetch.WaitEntered();
  for (int i = 1; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      // Different offsets, all inside the in-flight window.
      results[i] =
          cache.Get(kA, 1 * kMiB, i * 4096, 4096, 0, std::ref(fetch), Later());
    });
  }
  WaitUntil([&] {
    return cache.Counters(kA).coalesced_waits == uint64_t{kThreads - 1};
  });
  // A reader of cached data elsewhere is not blocked by the fetch.
  EXPECT_EQ(cache.Lookup(kB, 0, 1, 0).outcome, Outcome::kMiss);
  EXPECT_EQ(cache.Lookup(kA, 0, 1, 0).outcome, Outcome::kMiss);
  fetch.Release();
  for (auto& t : threads) t.join();
  EXPECT_EQ(fetch.calls(), 1);
  for (int i = 0; i < kThreads; ++i) {
    ASSERT_TRUE(results[i].ok()) << i << results[i].status();
    EXPECT_THAT(results[i]->extents,
                ElementsAre(Extent{i * 4096u, 4096, kStateHole}));
    EXPECT_EQ(results[i]->outcome, Outcome::kMiss);
  }
  EXPECT_EQ(cache.Counters(kA).upstream_calls, 1u);
}

TEST(ExtentCacheTest, WaiterRefetchesWhenTheCoalescedFetchFails) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  absl::Notification entered, release;
  std::atomic<int> calls{0};
  auto flaky = [&](uint64_t off, uint64_t len,
                   absl::Time) -> absl::StatusOr<ExtentList> {
    if (calls.fetch_add(1) == 0) {
      entered.Notify();
      release.WaitForNotification();
      return absl::UnavailableError("first call fails");
    }
    return ExtentList{{off, len, 0}};
  };
  absl::StatusOr<LookupResult> first, second;
  std::thread t1(
      [&] { first = cache.Get(kA, 1 * kMiB, 0, 4096, 0, flaky, Later()); });
  entered.WaitForNotification();
  std::thread t2(
      [&] { second = cache.Get(kA, 1 * kMiB, 0, 4096, 0, flaky, Later()); });
  WaitUntil([&] { return cache.Counters(kA).coalesced_waits == 1; });
  release.Notify();
  t1.join();
  t2.join();
  EXPECT_THAT(first, StatusIs(absl::StatusCode::kUnavailable));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_THAT(second->extents, ElementsAre(Extent{0, 4096, 0}));
  EXPECT_EQ(calls.load(), 2);
}

TEST(ExtentCacheTest, DeadlineWhileWaitingForACoalescedFetch) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  BlockingFetcher fetch(0);
  std::thread t([&] {
    EXPECT_TRUE(
        cache.Get(kA, 1 * kMiB, 0, 4096, 0, std::ref(fetch), Later()).ok());
  });
  fetch.WaitEntered();
  auto r = cache.Get(kA, 1 * kMiB, 0, 4096, 0, std::ref(fetch),
                     absl::Now() + absl::Milliseconds(50));
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(cache.Counters(kA).coalesced_waits, 1u);
  EXPECT_EQ(fetch.calls(), 1);
  fetch.Release();
  t.join();
  EXPECT_EQ(cache.Lookup(kA, 0, 4096, 0).outcome, Outcome::kHit);
}

TEST(ExtentCacheTest, ExpiredDeadlineDoesNotCallTheUpstream) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk disk({{4096, 0}});
  auto r = cache.Get(kA, 4096, 0, 4096, 0, std::ref(disk),
                     absl::Now() - absl::Seconds(1));
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(disk.calls.empty());
}

TEST(ExtentCacheTest, LookupCountsOnlyWhenRecorded) {
  ExtentCache cache(SmallWindow(1 * kMiB));
  FakeDisk disk({{4096, 0}, {8192, 1}});
  disk.answer_len = 4096;
  ASSERT_TRUE(cache.Get(kA, 8192, 0, 1, 0, std::ref(disk), Later()).ok());
  cache.Lookup(kA, 0, 4096, 0);
  EXPECT_EQ(cache.Counters(kA).hits, 0u);
  EXPECT_EQ(cache.Lookup(CacheKey{"never", "base:allocation"}, 0, 1, 0).outcome,
            Outcome::kMiss);
  EXPECT_EQ(cache.Keys().size(), 1u);  // a lookup creates no key
  auto record = [&](uint64_t off, uint64_t len) {
    const LookupResult r = cache.Lookup(kA, off, len, 0);
    cache.Record(kA, off, r);
    return r.outcome;
  };
  EXPECT_EQ(record(0, 4096), Outcome::kHit);
  EXPECT_EQ(record(0, 8192), Outcome::kPartial);
  EXPECT_EQ(record(4096, 8192), Outcome::kMiss);
  const CacheCounters c = cache.Counters(kA);
  EXPECT_EQ(c.hits, 1u);
  EXPECT_EQ(c.partial_hits, 1u);
  EXPECT_EQ(c.misses, 2u);  // the first Get and the last Lookup
  EXPECT_EQ(c.bytes_from_cache, 8192u);
  const CacheCounters total = cache.Counters();
  EXPECT_EQ(total.hits, 1u);
  EXPECT_EQ(total.misses, 2u);
}

}  // namespace
}  // namespace blockmeta
