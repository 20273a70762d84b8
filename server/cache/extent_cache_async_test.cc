// server/cache/extent_cache_async_test.cc — ExtentCache with an
// asynchronous fetcher: detached deadlines (the caller gives up, the fetch
// runs on and is cached), single-flight across a detached wait, read-ahead
// for window-limited scans and long requests (how many in flight, where
// they stop, the poison rule), fills under memory pressure, and a cache
// destroyed with fetches in flight. The fake upstream queues fetches and the
// test completes them, so every interleaving is chosen, not slept for.
#include <algorithm>
#include <deque>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/common/mutex.h"
#include "tests/testing/async_disk.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using ::testing::ElementsAre;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

const CacheKey kA{"a", "base:allocation"};
const CacheKey kB{"b", "base:allocation"};

absl::Time Later() { return absl::Now() + absl::Seconds(30); }

using testing::AsyncDisk;

ExtentCache::Options Opts(uint64_t window, uint32_t read_ahead) {
  ExtentCache::Options o;
  o.fetch_window_bytes = window;
  o.read_ahead_windows = read_ahead;
  return o;
}

// Every extent matches the disk, contiguously from `offset`.
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

TEST(ExtentCacheAsyncTest, ImpatientCallerTimesOutAndTheLateAnswerIsCached) {
  ExtentCache cache(Opts(1 * kMiB, 0));
  AsyncDisk disk(4 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  // Something else cached beforehand, answered at once.
  std::thread t([&] { disk.WaitPending(1), disk.Complete(0); });
  ASSERT_TRUE(
      cache.Get(kA, disk.size(), 2 * kMiB, 4096, 0, fetch, Later()).ok());
  t.join();
  ASSERT_EQ(disk.calls(), 1);

  auto r = cache.Get(kA, disk.size(), 0, 4096, 0, fetch,
                     absl::Now() + absl::Milliseconds(50));
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded)) << r.status();
  EXPECT_EQ(disk.pending(), 1u);  // the fetch runs on
  EXPECT_EQ(cache.Counters(kA).detached_waits, 1u);
  // The rest of the cache still hits, with no upstream call.
  r = cache.Get(kA, disk.size(), 2 * kMiB, 4096, 0, fetch, Later());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->outcome, Outcome::kHit);
  EXPECT_EQ(disk.calls(), 2);
  // The late answer lands in the cache; the next caller hits it.
  disk.Complete(0);
  r = cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Later());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->outcome, Outcome::kHit);
  ExpectTruth(disk, 0, *r);
  EXPECT_EQ(disk.calls(), 2);
  EXPECT_EQ(cache.Counters(kA).upstream_calls, 2u);
}

TEST(ExtentCacheAsyncTest, SingleFlightHoldsAcrossADetachedWait) {
  ExtentCache cache(Opts(1 * kMiB, 0));
  AsyncDisk disk(4 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  auto r = cache.Get(kA, disk.size(), 0, 4096, 0, fetch,
                     absl::Now() + absl::Milliseconds(20));
  ASSERT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded));
  // A patient caller of the same gap waits for the same fetch.
  absl::StatusOr<LookupResult> patient;
  std::thread t([&] {
    patient = cache.Get(kA, disk.size(), 4096, 8192, 0, fetch, Later());
  });
  // Wait until it is waiting (it counts a coalesced wait first).
  while (cache.Counters(kA).coalesced_waits == 0) std::this_thread::yield();
  EXPECT_EQ(disk.calls(), 1);
  disk.Complete(0);
  t.join();
  ASSERT_TRUE(patient.ok()) << patient.status();
  ExpectTruth(disk, 4096, *patient);
  EXPECT_EQ(patient->next_offset, 4096u + 8192u);
  EXPECT_EQ(disk.calls(), 1);
}

TEST(ExtentCacheAsyncTest, FailedFetchIsNotCachedAndTheWaiterRetries) {
  ExtentCache cache(Opts(1 * kMiB, 0));
  AsyncDisk disk(4 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  ASSERT_THAT(cache
                  .Get(kA, disk.size(), 0, 4096, 0, fetch,
                       absl::Now() + absl::Milliseconds(20))
                  .status(),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  absl::StatusOr<LookupResult> waiter;
  std::thread t(
      [&] { waiter = cache.Get(kA, disk.size(), 0, 4096, 0, fetch, Later()); });
  while (cache.Counters(kA).coalesced_waits == 0) std::this_thread::yield();
  disk.Complete(0, absl::UnavailableError("injected"));
  // The waiter fetches itself.
  ASSERT_TRUE(disk.WaitPending(1));
  disk.Complete(0);
  t.join();
  ASSERT_TRUE(waiter.ok()) << waiter.status();
  ExpectTruth(disk, 0, *waiter);
  EXPECT_EQ(cache.Counters(kA).upstream_errors, 1u);
  EXPECT_EQ(cache.Counters(kA).upstream_calls, 2u);
}

// A window-limited upstream: a scan's second step issues the demand fetch
// and read_ahead_windows more, all in flight at once.
TEST(ExtentCacheAsyncTest, WindowLimitedScanKeepsReadAheadInFlight) {
  constexpr uint64_t kL = 256 * kKiB;
  ExtentCache cache(Opts(64 * kMiB, 4));
  AsyncDisk disk(8 * kMiB, 16 * kKiB);
  disk.set_limit(kL);
  const AsyncFetcher fetch = disk.Fetcher();
  std::thread t([&] { disk.WaitPending(1), disk.Complete(0); });
  auto r = cache.Get(kA, disk.size(), 0, disk.size(), 0, fetch, Later());
  t.join();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->next_offset, kL);  // answered short
  EXPECT_EQ(cache.Counters(kA).read_ahead_issued, 0u);
  // The next step starts at the end of the short answer: 1 + 4 fetches.
  absl::StatusOr<LookupResult> step;
  std::thread s([&] {
    step = cache.Get(kA, disk.size(), kL, disk.size() - kL, 0, fetch, Later());
  });
  ASSERT_TRUE(disk.WaitPending(5));
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(std::pair<uint64_t, uint64_t>{kL, 8 * kMiB - kL},
                          std::pair<uint64_t, uint64_t>{2 * kL, kL},
                          std::pair<uint64_t, uint64_t>{3 * kL, kL},
                          std::pair<uint64_t, uint64_t>{4 * kL, kL},
                          std::pair<uint64_t, uint64_t>{5 * kL, kL}));
  EXPECT_EQ(cache.Counters(kA).read_ahead_issued, 4u);
  disk.Complete(0);
  s.join();
  ASSERT_TRUE(step.ok());
  ExpectTruth(disk, kL, *step);
  // The scan reads the windows: hits, and the read-ahead tops up.
  disk.StartAutoComplete();
  uint64_t pos = step->next_offset;
  while (pos < disk.size()) {
    auto n =
        cache.Get(kA, disk.size(), pos, disk.size() - pos, 0, fetch, Later());
    ASSERT_TRUE(n.ok()) << n.status();
    ExpectTruth(disk, pos, *n);
    pos = n->next_offset;
  }
  disk.StopAutoComplete();
  const CacheCounters c = cache.Counters(kA);
  const uint64_t windows = disk.size() / kL;  // 32
  EXPECT_GE(c.read_ahead_hits, windows - 8);
  // Each window fetched about once: no duplicates beyond the demand ones.
  EXPECT_LE(c.upstream_calls, windows + 4);
  EXPECT_LE(disk.max_pending(), 5u);  // never more than 1 + 4 per key
  EXPECT_LE(c.read_ahead_hits + c.read_ahead_wasted, c.read_ahead_issued);
}

// A request beyond one window (a cold map of a large disk) fetches its
// windows in parallel, stopping at the request end.
TEST(ExtentCacheAsyncTest, LongRequestFetchesWindowsInParallel) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 8));
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  absl::StatusOr<LookupResult> r;
  std::thread t(
      [&] { r = cache.Get(kA, disk.size(), 0, 5 * kW, 4, fetch, Later()); });
  ASSERT_TRUE(disk.WaitPending(5));  // demand + 4 windows to the request end
  auto ranges = disk.PendingRanges();
  ASSERT_EQ(ranges.size(), 5u);
  for (size_t i = 0; i < ranges.size(); ++i) {
    EXPECT_EQ(ranges[i].first, i * kW);
    EXPECT_EQ(ranges[i].second, kW);
  }
  disk.CompleteAll();
  t.join();
  ASSERT_TRUE(r.ok());
  ExpectTruth(disk, 0, *r);
  // The rest of the request is answered from the cache.
  auto rest = cache.Get(kA, disk.size(), r->next_offset,
                        5 * kW - r->next_offset, 0, fetch, Later());
  ASSERT_TRUE(rest.ok());
  EXPECT_EQ(rest->outcome, Outcome::kHit);
  EXPECT_EQ(rest->next_offset, 5 * kW);
  EXPECT_EQ(disk.calls(), 5);
}

// Read-ahead stops at the export end and is off with read_ahead_windows 0.
TEST(ExtentCacheAsyncTest, ReadAheadStopsAtTheExportEnd) {
  constexpr uint64_t kW = 1 * kMiB;
  for (uint32_t n : {0u, 8u}) {
    ExtentCache cache(Opts(kW, n));
    AsyncDisk disk(3 * kMiB + 4096, 64 * kKiB);
    disk.StartAutoComplete();
    auto r =
        cache.Get(kA, disk.size(), 0, disk.size(), 0, disk.Fetcher(), Later());
    ASSERT_TRUE(r.ok());
    disk.StopAutoComplete();
    // The fake checks that no fetch reaches past the end.
    EXPECT_EQ(cache.Counters(kA).read_ahead_issued, n == 0 ? 0u : 3u) << n;
    EXPECT_EQ(disk.calls(), n == 0 ? 1 : 4) << n;
  }
}

// The poison rule applies to read-ahead fetches in flight.
TEST(ExtentCacheAsyncTest, WriteDuringReadAheadIsNeverCached) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 2));
  AsyncDisk disk(8 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  absl::StatusOr<LookupResult> r;
  std::thread t(
      [&] { r = cache.Get(kA, disk.size(), 0, 3 * kW, 0, fetch, Later()); });
  ASSERT_TRUE(disk.WaitPending(3));
  // The read-ahead window [1M, 2M) was read by the upstream before a write
  // inside it; the write invalidates while the answer is in flight.
  ASSERT_EQ(disk.PendingRanges()[1].first, kW);
  ExtentList old = disk.AnswerFor(1);
  disk.Flip(kW + 128 * kKiB, kW + 192 * kKiB);
  cache.Invalidate(kA, kW + 128 * kKiB, 64 * kKiB);
  disk.CompleteWith(1, std::move(old));
  disk.CompleteAll();
  t.join();
  ASSERT_TRUE(r.ok());
  // Whatever is cached matches the disk now.
  const LookupResult after = cache.Lookup(kA, kW, kW, 0);
  ExpectTruth(disk, kW, after);
  EXPECT_LE(after.next_offset, kW + 128 * kKiB);
  EXPECT_GE(cache.Counters(kA).stale_fills_dropped, 1u);
}

// Another key is never starved by a scan's read-ahead: its demand fetch is
// issued at once.
TEST(ExtentCacheAsyncTest, ReadAheadIsCappedPerKey) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 3));
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  auto r = cache.Get(kA, disk.size(), 0, disk.size(), 0, fetch,
                     absl::Now() + absl::Milliseconds(10));
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(disk.pending(), 4u);  // 1 + 3, not the whole disk
  auto b = cache.Get(kB, disk.size(), 0, 4096, 0, fetch,
                     absl::Now() + absl::Milliseconds(10));
  EXPECT_THAT(b, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(disk.pending(), 5u);
  disk.CompleteAll();
}

// A scan under memory pressure: every answer is bigger than the bound, yet
// the scan advances through the cached part nearest it, the bound holds,
// and the number of fetches stays near size / what-one-fill-keeps.
TEST(ExtentCacheAsyncTest, ScanMakesProgressUnderMemoryPressure) {
  ExtentCache::Options o = Opts(64 * kMiB, 8);
  o.memory_limit_bytes = 64 * kKiB;
  ExtentCache cache(o);
  AsyncDisk disk(32 * kMiB, 4096);  // 8192 extents: ~350 KiB of intervals
  disk.StartAutoComplete();
  const AsyncFetcher fetch = disk.Fetcher();
  uint64_t pos = 0;
  int steps = 0;
  while (pos < disk.size()) {
    // One extent per step, as qemu-img map asks (REQ_ONE).
    auto r =
        cache.Get(kA, disk.size(), pos, disk.size() - pos, 1, fetch, Later());
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->extents.size(), 1u);
    ASSERT_EQ(r->extents[0].flags, disk.FlagsAt(pos));
    pos = r->next_offset;
    ++steps;
    ASSERT_LE(cache.Counters().memory_bytes, o.memory_limit_bytes);
  }
  disk.StopAutoComplete();
  EXPECT_EQ(steps, 8192);
  // One fill keeps about (64 KiB / 2) / 48 B = 680 intervals.
  EXPECT_LE(disk.calls(), 8192 / 600 + 2);
}

// A REQ_ONE walk (qemu-img map: one extent per request, each request for
// half a window, inside full answers) is detected by its position: the
// first miss at offset 0 already keeps windows in flight, and the scan
// tops them up as it reads, through Get() hits.
TEST(ExtentCacheAsyncTest, ReqOneWalkReadsAheadByPosition) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 4));
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  absl::StatusOr<LookupResult> first;
  std::thread t([&] {
    first = cache.Get(kA, disk.size(), 0, kW / 2, 1, fetch, Later());
  });
  ASSERT_TRUE(disk.WaitPending(5));  // demand + 4 windows, at once
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(std::pair<uint64_t, uint64_t>{0, kW},
                          std::pair<uint64_t, uint64_t>{kW, kW},
                          std::pair<uint64_t, uint64_t>{2 * kW, kW},
                          std::pair<uint64_t, uint64_t>{3 * kW, kW},
                          std::pair<uint64_t, uint64_t>{4 * kW, kW}));
  disk.CompleteAll();
  t.join();
  ASSERT_TRUE(first.ok()) << first.status();
  disk.StartAutoComplete();
  uint64_t pos = first->next_offset;
  while (pos < disk.size()) {
    auto r = cache.Get(kA, disk.size(), pos,
                       std::min(kW / 2, disk.size() - pos), 1, fetch, Later());
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->extents.size(), 1u);
    ExpectTruth(disk, pos, *r);
    pos = r->next_offset;
  }
  disk.StopAutoComplete();
  const CacheCounters c = cache.Counters(kA);
  EXPECT_EQ(disk.calls(), 64);  // every window once
  EXPECT_EQ(c.read_ahead_issued, 63u);
  EXPECT_GE(c.read_ahead_hits, 60u) << "wasted " << c.read_ahead_wasted;
  EXPECT_LE(disk.max_pending(), 5u);  // never more than 1 + 4 per key
}

// The NBD shim answers warm REQ_ONE requests with Lookup() + Record() on
// its own thread: the walk is followed there too, with the fetcher of the
// key's last Get().
TEST(ExtentCacheAsyncTest, WalkSeenOnlyThroughRecordReadsAhead) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 4));
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  const AsyncFetcher fetch = disk.Fetcher();
  // A short first request is no walk yet: only its own window.
  std::thread t([&] { disk.WaitPending(1), disk.Complete(0); });
  auto first = cache.Get(kA, disk.size(), 0, 4096, 1, fetch, Later());
  t.join();
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(disk.calls(), 1);
  // Two warm steps in a row make a walk: windows after the cached one.
  uint64_t pos = first->next_offset;
  for (int i = 0; i < 2; ++i) {
    LookupResult r = cache.Lookup(kA, pos, 4096, 1);
    ASSERT_EQ(r.outcome, Outcome::kHit);
    cache.Record(kA, pos, r);
    pos = r.next_offset;
  }
  ASSERT_TRUE(disk.WaitPending(4));
  EXPECT_THAT(disk.PendingRanges(),
              ElementsAre(std::pair<uint64_t, uint64_t>{kW, kW},
                          std::pair<uint64_t, uint64_t>{2 * kW, kW},
                          std::pair<uint64_t, uint64_t>{3 * kW, kW},
                          std::pair<uint64_t, uint64_t>{4 * kW, kW}));
  // The rest of the walk, warm steps by Lookup()+Record(), cold ones by
  // Get(): every window is fetched once.
  disk.StartAutoComplete();
  int gets = 0;
  while (pos < disk.size()) {
    LookupResult r = cache.Lookup(kA, pos, 4096, 1);
    if (r.outcome == Outcome::kHit) {
      ExpectTruth(disk, pos, r);
      cache.Record(kA, pos, r);
      pos = r.next_offset;
      continue;
    }
    ++gets;
    auto g = cache.Get(kA, disk.size(), pos,
                       std::min<uint64_t>(4096, disk.size() - pos), 1, fetch,
                       Later());
    ASSERT_TRUE(g.ok()) << g.status();
    ExpectTruth(disk, pos, *g);
    pos = g->next_offset;
  }
  disk.StopAutoComplete();
  EXPECT_EQ(disk.calls(), 64);
  EXPECT_EQ(cache.Counters(kA).read_ahead_issued, 63u);
  // Read-ahead kept ahead of the walk, so few steps had to wait.
  EXPECT_LT(gets, 32);
}

// Reads that jump around (no two continue each other) start no read-ahead.
TEST(ExtentCacheAsyncTest, ScatteredReadsStartNoReadAhead) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 8));
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  disk.StartAutoComplete();
  for (uint64_t mib : {0, 10, 30, 5, 50, 20, 62, 40}) {
    auto r = cache.Get(kA, disk.size(), mib * kMiB + 8192, 4096, 1,
                       disk.Fetcher(), Later());
    ASSERT_TRUE(r.ok()) << r.status();
    LookupResult l = cache.Lookup(kA, mib * kMiB + 40 * kMiB % 64, 4096, 1);
    cache.Record(kA, mib * kMiB + 40 * kMiB % 64, l);
  }
  disk.StopAutoComplete();
  EXPECT_EQ(cache.Counters(kA).read_ahead_issued, 0u);
  EXPECT_EQ(disk.calls(), 8);
}

// A walk over a warm cache fetches nothing: read-ahead skips what is
// cached.
TEST(ExtentCacheAsyncTest, WalkOverAWarmCacheFetchesNothing) {
  constexpr uint64_t kW = 1 * kMiB;
  ExtentCache cache(Opts(kW, 4));
  AsyncDisk disk(16 * kMiB, 64 * kKiB);
  disk.StartAutoComplete();
  const AsyncFetcher fetch = disk.Fetcher();
  for (uint64_t pos = 0; pos < disk.size();) {
    auto r =
        cache.Get(kA, disk.size(), pos, disk.size() - pos, 0, fetch, Later());
    ASSERT_TRUE(r.ok());
    pos = r->next_offset;
  }
  const int warm = disk.calls();
  EXPECT_EQ(warm, 16);
  for (uint64_t pos = 0; pos < disk.size();) {
    auto r = cache.Get(kA, disk.size(), pos, kW / 2, 1, fetch, Later());
    ASSERT_TRUE(r.ok());
    ASSERT_EQ(r->outcome, Outcome::kHit);
    LookupResult l = cache.Lookup(kA, r->next_offset, kW / 2, 1);
    if (l.outcome == Outcome::kHit) cache.Record(kA, r->next_offset, l);
    pos = l.outcome == Outcome::kHit ? l.next_offset : r->next_offset;
  }
  disk.StopAutoComplete();
  EXPECT_EQ(disk.calls(), warm);
}

TEST(ExtentCacheAsyncTest, CacheDestroyedWithFetchesInFlight) {
  AsyncDisk disk(64 * kMiB, 64 * kKiB);
  {
    ExtentCache cache(Opts(1 * kMiB, 4));
    auto r = cache.Get(kA, disk.size(), 0, disk.size(), 0, disk.Fetcher(),
                       absl::Now() + absl::Milliseconds(5));
    EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded));
  }
  EXPECT_EQ(disk.pending(), 5u);
  disk.CompleteAll();  // completions outlive the cache safely
}

}  // namespace
}  // namespace blockmeta
