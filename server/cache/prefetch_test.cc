// server/cache/prefetch_test.cc — whole-map prefetch
// (ExtentCache::SetExportPrefetch): how many fetches it keeps in flight, that
// it yields to callers' own misses, that a caller is served as soon as its
// range arrives, the poison rule for prefetch windows, the memory bound, and
// that it is off unless set. The fake upstream queues fetches and the test
// completes them, so every interleaving is chosen, not slept for.
#include <cstdint>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "tests/testing/async_disk.h"
#include "tests/testing/eventually.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using testing::AsyncDisk;
using ::testing::ElementsAre;
using Range = std::pair<uint64_t, uint64_t>;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kW = 1 * kMiB;

const CacheKey kA{"a", "base:allocation"};
const CacheKey kB{"b", "base:allocation"};

absl::Time Later() { return absl::Now() + absl::Seconds(30); }
absl::Time Soon() { return absl::Now() + absl::Milliseconds(5); }

// Read-ahead off, so every fetch beyond the callers' own is the prefetch's.
ExtentCache::Options Opts() {
  ExtentCache::Options o;
  o.fetch_window_bytes = kW;
  o.read_ahead_windows = 0;
  return o;
}

// Every unit of r matches the disk, contiguously from `offset`.
void ExpectTruth(const AsyncDisk& disk, uint64_t offset,
                 const LookupResult& r) {
  uint64_t pos = offset;
  for (const Extent& e : r.extents) {
    ASSERT_EQ(e.offset, pos);
    for (uint64_t u = e.offset; u < e.end(); u += 4096) {
      ASSERT_EQ(e.flags, disk.FlagsAt(u)) << "at " << u;
    }
    pos = e.end();
  }
  EXPECT_EQ(pos, r.next_offset);
}

// Answers every fetch of `disk` until export "a"'s prefetch has completed
// (false if it did not within Eventually's bound).
bool AnswerUntilPrefetchCompleted(AsyncDisk& disk, const ExtentCache& cache) {
  disk.StartAutoComplete();
  const bool done = testing::Eventually(
      [&] { return cache.Counters(kA).prefetch_completed == 1; });
  disk.StopAutoComplete();
  return done;
}

TEST(PrefetchTest, FirstTouchMapsTheWholeExportInParallel) {
  ExtentCache cache(Opts());
  cache.SetExportPrefetch("a", 4);
  EXPECT_EQ(cache.ExportPrefetch("a"), 4u);
  EXPECT_EQ(cache.ExportPrefetch("b"), 0u);
  AsyncDisk disk(16 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  // The caller's own fetch and 3 prefetch windows (4 minus the caller's).
  auto r = cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Soon());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(Range{0, kW}, Range{kW, kW}, Range{2 * kW, kW},
                          Range{3 * kW, kW}));
  EXPECT_EQ(cache.Counters(kA).prefetch_inflight, 3u);
  // The caller's fetch done: its slot goes to the prefetch.
  disk.Complete(0);
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(Range{kW, kW}, Range{2 * kW, kW}, Range{3 * kW, kW},
                          Range{4 * kW, kW}));
  ASSERT_TRUE(AnswerUntilPrefetchCompleted(disk, cache));
  const CacheCounters c = cache.Counters(kA);
  EXPECT_EQ(disk.calls(), 16);  // every window once
  EXPECT_EQ(c.prefetch_issued, 15u);
  EXPECT_EQ(c.prefetch_bytes, 15 * kW);
  EXPECT_EQ(c.prefetch_inflight, 0u);
  EXPECT_LE(disk.max_pending(), 4u);
  // The whole map is cached and true.
  const LookupResult all = cache.Lookup(kA, 0, disk.size(), 0);
  EXPECT_EQ(all.outcome, Outcome::kHit);
  ExpectTruth(disk, 0, all);
  // Another export without the option prefetches nothing.
  disk.StartAutoComplete();
  ASSERT_TRUE(cache.Get(kB, disk.size(), 0, 4096, 0, fetch, Later()).ok());
  disk.StopAutoComplete();
  EXPECT_EQ(cache.Counters(kB).prefetch_issued, 0u);
  EXPECT_EQ(disk.calls(), 17);
}

// A caller whose range a prefetch window covers waits for that window only,
// not for the rest of the map.
TEST(PrefetchTest, CallerIsServedWhenItsRangeArrives) {
  ExtentCache cache(Opts());
  cache.SetExportPrefetch("a", 3);
  AsyncDisk disk(16 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  EXPECT_THAT(cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Soon()),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  ASSERT_THAT(disk.PendingRanges(),
              ElementsAre(Range{0, kW}, Range{kW, kW}, Range{2 * kW, kW}));
  absl::StatusOr<LookupResult> r;
  std::thread t([&] {
    r = cache.Get(kA, disk.size(), 2 * kW + 4096, 8192, 0, fetch, Later());
  });
  ASSERT_TRUE(testing::Eventually(
      [&] { return cache.Counters(kA).coalesced_waits == 1; }));
  disk.Complete(2);  // only the window [2M, 3M)
  t.join();
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectTruth(disk, 2 * kW + 4096, *r);
  EXPECT_EQ(cache.Counters(kA).prefetch_hits, 1u);
  EXPECT_EQ(disk.pending(), 3u);  // [0, 1M), [1M, 2M) and the next window
  disk.CompleteAll();
}

// While callers' own fetches of the key are in flight, the prefetch keeps
// fewer windows in flight: at most `parallel` fetches in all.
TEST(PrefetchTest, YieldsToCallersOwnMisses) {
  ExtentCache cache(Opts());
  cache.SetExportPrefetch("a", 2);
  AsyncDisk disk(32 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  EXPECT_THAT(cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Soon()),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  ASSERT_THAT(disk.PendingRanges(), ElementsAre(Range{0, kW}, Range{kW, kW}));
  // A second caller misses far away: a fetch of its own, at once.
  EXPECT_THAT(cache.Get(kA, disk.size(), 20 * kW, 4096, 0, fetch, Soon()),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  ASSERT_EQ(disk.pending(), 3u);
  // The prefetch window completes; with two callers' fetches in flight the
  // prefetch issues nothing new.
  disk.Complete(1);
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(Range{0, kW}, Range{20 * kW, kW}));
  // As the callers' fetches finish, it takes their slots again.
  disk.Complete(1);
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(Range{0, kW}, Range{2 * kW, kW}));
  disk.Complete(0);
  EXPECT_EQ(disk.pending(), 2u);
  ASSERT_TRUE(AnswerUntilPrefetchCompleted(disk, cache));
  EXPECT_EQ(disk.calls(), 32);  // the callers' window [20M, 21M) is skipped
  EXPECT_LE(disk.max_pending(), 3u);
}

// A write while a prefetch window is in flight: nothing from the written
// granule on is cached, and the prefetch fetches it again from there. The
// caller's window came back first, so the key knows its granule bound
// (64 KiB runs) and the write is rounded to it, not to the whole context.
TEST(PrefetchTest, WriteDuringPrefetchIsNeverCached) {
  ExtentCache cache(Opts());
  cache.SetExportPrefetch("a", 2);
  AsyncDisk disk(4 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  EXPECT_THAT(cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Soon()),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  ASSERT_THAT(disk.PendingRanges(), ElementsAre(Range{0, kW}, Range{kW, kW}));
  disk.Complete(0);
  ASSERT_THAT(disk.PendingRanges(),
              ElementsAre(Range{kW, kW}, Range{2 * kW, kW}));
  ExtentList old = disk.AnswerFor(0);  // read by the upstream before...
  disk.Flip(kW + 128 * kKiB, kW + 192 * kKiB);  // ...a write inside it
  cache.InvalidateExportRange("a", kW + 128 * kKiB, 64 * kKiB);
  disk.CompleteWith(0, std::move(old));
  EXPECT_GE(cache.Counters(kA).stale_fills_dropped, 1u);
  ASSERT_TRUE(AnswerUntilPrefetchCompleted(disk, cache));
  const LookupResult all = cache.Lookup(kA, 0, disk.size(), 0);
  EXPECT_EQ(all.outcome, Outcome::kHit);
  ExpectTruth(disk, 0, all);
  // [1M + 128K, 2M) was fetched again: 4 windows + 1.
  EXPECT_EQ(disk.calls(), 5);
}

// A write before any answer arrived: the key has no granule bound yet, so
// the write forgets the whole context and cuts every fetch in flight, the
// caller's own included. The prefetch still maps everything: it fetches
// again what the caller's window lost, not only its own windows.
TEST(PrefetchTest, WriteBeforeAnyBoundIsRemappedWhole) {
  ExtentCache cache(Opts());
  cache.SetExportPrefetch("a", 2);
  AsyncDisk disk(4 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  EXPECT_THAT(cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Soon()),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  ASSERT_THAT(disk.PendingRanges(), ElementsAre(Range{0, kW}, Range{kW, kW}));
  ExtentList old = disk.AnswerFor(1);
  disk.Flip(kW + 128 * kKiB, kW + 192 * kKiB);
  cache.InvalidateExportRange("a", kW + 128 * kKiB, 64 * kKiB);
  disk.CompleteWith(1, std::move(old));
  EXPECT_GE(cache.Counters(kA).stale_fills_dropped, 1u);
  ASSERT_TRUE(AnswerUntilPrefetchCompleted(disk, cache));
  const LookupResult all = cache.Lookup(kA, 0, disk.size(), 0);
  EXPECT_EQ(all.outcome, Outcome::kHit);
  ExpectTruth(disk, 0, all);
  // Both windows in flight were cut whole and fetched again: 4 + 2.
  EXPECT_EQ(disk.calls(), 6);
}

// A map bigger than the memory bound: the prefetch gives way (ends without
// completing) and the bound holds.
TEST(PrefetchTest, EndsNearTheMemoryBound) {
  ExtentCache::Options o = Opts();
  o.memory_limit_bytes = 64 * kKiB;
  ExtentCache cache(o);
  cache.SetExportPrefetch("a", 4);
  AsyncDisk disk(64 * kMiB, 4096);  // 16384 extents: ~700 KiB of intervals
  disk.StartAutoComplete();
  ASSERT_TRUE(
      cache.Get(kA, disk.size(), 0, 4096, 0, disk.Fetcher(), Later()).ok());
  ASSERT_TRUE(testing::Eventually(
      [&] { return cache.Counters(kA).prefetch_inflight == 0; }));
  disk.StopAutoComplete();
  const CacheCounters c = cache.Counters(kA);
  EXPECT_EQ(c.prefetch_completed, 0u);
  EXPECT_LT(c.prefetch_issued, 63u);
  EXPECT_LE(cache.Counters().memory_bytes, o.memory_limit_bytes);
}

// After the whole export is forgotten (the upstream reconnected), the next
// touch maps it again.
TEST(PrefetchTest, ForgottenExportIsPrefetchedAgain) {
  ExtentCache cache(Opts());
  cache.SetExportPrefetch("a", 2);
  AsyncDisk disk(4 * kMiB, 64 * kKiB);
  disk.StartAutoComplete();
  const AsyncFetcher fetch = disk.Fetcher();
  ASSERT_TRUE(cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Later()).ok());
  ASSERT_TRUE(testing::Eventually(
      [&] { return cache.Counters(kA).prefetch_completed == 1; }));
  EXPECT_EQ(disk.calls(), 4);
  cache.InvalidateExport("a");
  ASSERT_TRUE(cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Later()).ok());
  ASSERT_TRUE(testing::Eventually(
      [&] { return cache.Counters(kA).prefetch_completed == 2; }));
  disk.StopAutoComplete();
  EXPECT_EQ(disk.calls(), 8);
  // A range write does not restart it: the written range is a miss.
  cache.InvalidateExportRange("a", kW, 4096);
  EXPECT_EQ(cache.Counters(kA).prefetch_issued, 6u);
}

// Removing the export ends its prefetch; completions in flight are safe.
TEST(PrefetchTest, RemovedExportStopsPrefetching) {
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  {
    ExtentCache cache(Opts());
    cache.SetExportPrefetch("a", 4);
    EXPECT_THAT(cache.Get(kA, disk.size(), 0, 4096, 0, disk.Fetcher(), Soon()),
                StatusIs(absl::StatusCode::kDeadlineExceeded));
    EXPECT_EQ(disk.pending(), 4u);
    cache.RemoveExport("a");
    EXPECT_EQ(cache.ExportPrefetch("a"), 0u);
    disk.CompleteAll();  // no new prefetch windows
    EXPECT_EQ(disk.calls(), 4);
  }
}

}  // namespace
}  // namespace blockmeta
