// server/service/totals_test.cc — GetTotals logic on a fake upstream
// against a reference model (the range cut at every truth-table boundary):
// random disks (allocation flags 0-3, two dirty bitmaps), random ranges,
// random context sets and upstream reply sizes; the walk goes through the
// cache (a repeat is a hit with no upstream call, a map's cache is reused),
// slicing neither changes the answer nor adds upstream calls, and every
// validation error has its code.
#include "server/service/totals.h"

#include <algorithm>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/common/mutex.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;

constexpr uint64_t kSize = 256 * 1024;
const char* const kContexts[] = {"base:allocation", "qemu:dirty-bitmap:a",
                                 "qemu:dirty-bitmap:b"};

absl::Time Deadline() { return absl::Now() + absl::Seconds(30); }

ExtentList RandomTruth(std::mt19937_64* rng, bool dirty) {
  ExtentList out;
  const uint64_t max_run = 1 + (*rng)() % 20000;
  for (uint64_t off = 0; off < kSize;) {
    uint64_t len = std::min<uint64_t>(kSize - off, 1 + (*rng)() % max_run);
    uint32_t f = dirty ? static_cast<uint32_t>((*rng)() % 2)
                       : static_cast<uint32_t>((*rng)() % 4);
    out.push_back({off, len, f});
    off += len;
  }
  return out;
}

// Answers block status after `delay`, on a thread of its own, like a slow
// upstream whose answers arrive after the caller stopped waiting.
class SlowUpstream : public FakeUpstream {
 public:
  SlowUpstream(uint64_t size, absl::Duration delay)
      : FakeUpstream(size, 512, false), delay_(delay) {}
  // Joins every answer thread (an answer may issue read-ahead, which
  // starts more threads, so join until none is left).
  ~SlowUpstream() override {
    while (true) {
      std::vector<std::thread> threads;
      {
        sync::MutexLock l(&mu_);
        threads.swap(threads_);
      }
      if (threads.empty()) return;
      for (std::thread& t : threads) t.join();
    }
  }
  void AsyncBlockStatus(const std::string& context, uint64_t offset,
                        uint64_t length, ExtentsCallback done) override {
    sync::MutexLock l(&mu_);
    threads_.emplace_back(
        [this, context, offset, length, done = std::move(done)]() mutable {
          absl::SleepFor(delay_);
          std::move(done)(
              BlockStatus(context, offset, length, absl::InfiniteFuture()));
        });
  }

 private:
  const absl::Duration delay_;
  sync::Mutex mu_;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
};

// The expected totals of one context, from the truth tables byte by byte.
struct Expected {
  uint64_t extents = 0, data = 0, hole = 0, zero = 0, nonzero = 0;
  uint64_t dirty = 0, clean = 0, dirty_data = 0, dirty_nonzero = 0;
  std::map<uint32_t, uint64_t> by_flags;
};

class TotalsTest : public ::testing::Test {
 protected:
  void Build(std::vector<ExtentList> truths, size_t reply_max = SIZE_MAX,
             absl::Duration delay = absl::ZeroDuration(),
             uint64_t size = kSize) {
    std::unique_ptr<FakeUpstream> disk;
    if (delay > absl::ZeroDuration()) {
      disk = std::make_unique<SlowUpstream>(size, delay);
    } else {
      disk = std::make_unique<FakeUpstream>(size, 512, false);
    }
    for (size_t i = 0; i < truths.size(); ++i) {
      disk->SetContextTruth(kContexts[i], truths[i]);
    }
    disk->SetReplyExtentsMax(reply_max);
    disk_ = disk.get();
    truths_ = std::move(truths);
    std::vector<std::pair<v1::ExportConfig, std::unique_ptr<Upstream>>> ex;
    v1::ExportConfig c;
    c.set_name("disk");
    ex.emplace_back(c, std::move(disk));
    registry_ = ExportRegistry::FromUpstreams(std::move(ex));
    ExtentCache::Options co;
    co.fetch_window_bytes = 64 * 1024;  // several windows per disk
    cache_ = std::make_unique<ExtentCache>(co);
    service_ = std::make_unique<ExtentService>(registry_.get(), cache_.get(),
                                               ExtentService::Options{});
  }

  uint32_t Truth(size_t ctx, uint64_t byte) const {
    for (const Extent& e : truths_[ctx]) {
      if (byte >= e.offset && byte < e.end()) return e.flags;
    }
    ADD_FAILURE() << "no truth at " << byte;
    return 0;
  }

  // The expected totals of [start, end) for the contexts `asked` (indices
  // into kContexts, in request order): the range is cut at every boundary
  // of every asked truth table, and each piece's length is added where
  // its flags say. `merged` counts the runs of equal flag tuples.
  std::vector<Expected> Model(uint64_t start, uint64_t end,
                              const std::vector<size_t>& asked,
                              uint64_t* merged) const {
    std::vector<Expected> out(asked.size());
    std::vector<uint64_t> cuts = {start, end};
    for (size_t i : asked) {
      for (const Extent& e : truths_[i]) {
        if (e.offset > start && e.offset < end) cuts.push_back(e.offset);
      }
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<uint32_t> last;
    *merged = 0;
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {
      const uint64_t at = cuts[c], len = cuts[c + 1] - cuts[c];
      std::vector<uint32_t> now;
      now.reserve(asked.size());
      for (size_t i : asked) now.push_back(Truth(i, at));
      uint32_t alloc = 0;
      bool with_alloc = false;
      for (size_t j = 0; j < asked.size(); ++j) {
        if (asked[j] == 0) {
          alloc = now[j];
          with_alloc = true;
        }
      }
      for (size_t j = 0; j < asked.size(); ++j) {
        const uint32_t f = now[j];
        Expected& x = out[j];
        if (last.empty() || last[j] != f) ++x.extents;
        x.by_flags[f] += len;
        if (asked[j] == 0) {
          ((f & kStateHole) ? x.hole : x.data) += len;
          ((f & kStateZero) ? x.zero : x.nonzero) += len;
        } else if (f & kStateDirty) {
          x.dirty += len;
          if (with_alloc && !(alloc & kStateHole)) x.dirty_data += len;
          if (with_alloc && !(alloc & kStateZero)) x.dirty_nonzero += len;
        } else {
          x.clean += len;
        }
      }
      if (now != last) ++*merged;
      last = std::move(now);
    }
    return out;
  }

  static v1::GetTotalsRequest Request(uint64_t off, uint64_t len,
                                      const std::vector<size_t>& asked) {
    v1::GetTotalsRequest r;
    r.set_export_name("disk");
    r.set_offset(off);
    r.set_length(len);
    for (size_t i : asked) r.add_contexts(kContexts[i]);
    return r;
  }

  absl::StatusOr<v1::GetTotalsResponse> Totals(const v1::GetTotalsRequest& r,
                                               absl::Time deadline) {
    absl::StatusOr<TotalsCursor> c = PrepareTotals(*service_, r);
    if (!c.ok()) return c.status();
    return ComputeTotals(service_.get(), &*c, deadline);
  }

  void CheckAgainstModel(const v1::GetTotalsResponse& got, uint64_t start,
                         uint64_t end, const std::vector<size_t>& asked) {
    uint64_t merged = 0;
    std::vector<Expected> want = Model(start, end, asked, &merged);
    EXPECT_EQ(got.export_name(), "disk");
    EXPECT_EQ(got.export_size(), kSize);
    EXPECT_EQ(got.offset(), start);
    EXPECT_EQ(got.length(), end - start);
    EXPECT_EQ(got.extents(), merged);
    ASSERT_EQ(got.contexts_size(), static_cast<int>(asked.size()));
    const bool with_alloc =
        std::find(asked.begin(), asked.end(), 0) != asked.end();
    for (size_t j = 0; j < asked.size(); ++j) {
      const v1::ContextTotals& t = got.contexts(static_cast<int>(j));
      const Expected& x = want[j];
      SCOPED_TRACE(t.context());
      EXPECT_EQ(t.context(), kContexts[asked[j]]);
      EXPECT_EQ(t.extents(), x.extents);
      EXPECT_EQ(t.data(), x.data);
      EXPECT_EQ(t.hole(), x.hole);
      EXPECT_EQ(t.zero(), x.zero);
      EXPECT_EQ(t.nonzero(), x.nonzero);
      EXPECT_EQ(t.dirty(), x.dirty);
      EXPECT_EQ(t.clean(), x.clean);
      const bool bitmap = asked[j] != 0;
      EXPECT_EQ(t.has_dirty_data(), bitmap && with_alloc);
      EXPECT_EQ(t.has_dirty_nonzero(), bitmap && with_alloc);
      EXPECT_EQ(t.dirty_data(), x.dirty_data);
      EXPECT_EQ(t.dirty_nonzero(), x.dirty_nonzero);
      std::map<uint32_t, uint64_t> by_flags;
      uint32_t prev = 0;
      for (int k = 0; k < t.by_flags_size(); ++k) {
        if (k > 0) {
          EXPECT_GT(t.by_flags(k).flags(), prev);
        }
        prev = t.by_flags(k).flags();
        by_flags[prev] = t.by_flags(k).bytes();
      }
      EXPECT_EQ(by_flags, x.by_flags);
      EXPECT_FALSE(t.by_flags_truncated());
    }
  }

  FakeUpstream* disk_ = nullptr;
  std::vector<ExtentList> truths_;
  std::unique_ptr<ExportRegistry> registry_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<ExtentService> service_;
};

TEST_F(TotalsTest, RandomDisksAndRangesMatchAReferenceModel) {
  std::mt19937_64 rng(2026);
  for (int round = 0; round < 40; ++round) {
    SCOPED_TRACE(round);
    Build({RandomTruth(&rng, false), RandomTruth(&rng, true),
           RandomTruth(&rng, true)},
          /*reply_max=*/1 + rng() % 50);
    // A random non-empty subset of the contexts, in random order.
    std::vector<size_t> asked = {0, 1, 2};
    std::shuffle(asked.begin(), asked.end(), rng);
    asked.resize(1 + rng() % 3);
    for (int q = 0; q < 3; ++q) {
      uint64_t start = rng() % kSize;
      // length 0 = to the end; some past the end (clipped).
      uint64_t len = rng() % 4 == 0 ? 0 : 1 + rng() % kSize;
      uint64_t end = len == 0 ? kSize : std::min(kSize, start + len);
      absl::StatusOr<v1::GetTotalsResponse> r =
          Totals(Request(start, len, asked), Deadline());
      ASSERT_TRUE(r.ok()) << r.status();
      CheckAgainstModel(*r, start, end, asked);
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(TotalsTest, DefaultIsBaseAllocationOverTheWholeExport) {
  std::mt19937_64 rng(5);
  Build({RandomTruth(&rng, false)});
  v1::GetTotalsRequest r;
  r.set_export_name("disk");
  absl::StatusOr<v1::GetTotalsResponse> got = Totals(r, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  CheckAgainstModel(*got, 0, kSize, {0});
  // "" names base:allocation too.
  r.add_contexts("");
  got = Totals(r, Deadline());
  ASSERT_TRUE(got.ok()) << got.status();
  CheckAgainstModel(*got, 0, kSize, {0});
}

TEST_F(TotalsTest, WalksThroughTheCache) {
  std::mt19937_64 rng(9);
  Build({RandomTruth(&rng, false), RandomTruth(&rng, true)});
  absl::StatusOr<v1::GetTotalsResponse> r =
      Totals(Request(0, 0, {0, 1}), Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  // Cold: from the upstream (later batches may hit what the first answer
  // brought: PARTIAL).
  EXPECT_NE(r->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  // At most one upstream call per 64 KiB window per context (an answer
  // may run past its window and save the next call).
  const uint64_t calls = disk_->block_status_calls();
  EXPECT_GE(calls, 2u);
  EXPECT_LE(calls, 2 * kSize / (64 * 1024));
  // Again: every byte from the cache, no upstream call.
  r = Totals(Request(0, 0, {0, 1}), Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(disk_->block_status_calls(), calls);
  CheckAgainstModel(*r, 0, kSize, {0, 1});
  // A one-context totals of a sub-range: a hit on the same key.
  r = Totals(Request(1000, 100000, {1}), Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(disk_->block_status_calls(), calls);
  // REFRESH asks the upstream again; BYPASS too, without filling the cache.
  v1::GetTotalsRequest refresh = Request(0, 0, {0});
  refresh.set_cache_mode(v1::CACHE_MODE_REFRESH);
  r = Totals(refresh, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  // (Later windows may come from read-ahead the refresh started: PARTIAL.)
  EXPECT_NE(r->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_GT(disk_->block_status_calls(), calls);
  CheckAgainstModel(*r, 0, kSize, {0});
  v1::GetTotalsRequest bypass = Request(0, 0, {0});
  bypass.set_cache_mode(v1::CACHE_MODE_BYPASS);
  r = Totals(bypass, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_BYPASS);
  CheckAgainstModel(*r, 0, kSize, {0});
}

TEST_F(TotalsTest, UsesWhatAMapCached) {
  std::mt19937_64 rng(13);
  Build({RandomTruth(&rng, false)});
  v1::MapExtentsRequest m;
  m.set_export_name("disk");
  m.set_batch_size(7);
  absl::StatusOr<ExtentService::Cursor> c = service_->PrepareMap(m);
  ASSERT_TRUE(c.ok());
  while (true) {
    absl::StatusOr<ExtentService::Batch> b =
        service_->NextBatch(&*c, Deadline());
    ASSERT_TRUE(b.ok()) << b.status();
    if (b->done) break;
  }
  const uint64_t calls = disk_->block_status_calls();
  absl::StatusOr<v1::GetTotalsResponse> r =
      Totals(Request(0, 0, {0}), Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(disk_->block_status_calls(), calls);
}

TEST_F(TotalsTest, SlicingNeitherChangesTheAnswerNorAddsUpstreamCalls) {
  // Each answer arrives 500 ms after it was asked. The same disk is
  // totalled once in one step and once in 10 ms slices, for one context
  // (its cursor alone) and for two (merged).
  std::mt19937_64 rng(21);
  const std::vector<ExtentList> truths = {RandomTruth(&rng, false),
                                          RandomTruth(&rng, true)};
  for (const std::vector<size_t>& asked :
       {std::vector<size_t>{0}, std::vector<size_t>{0, 1}}) {
    SCOPED_TRACE(asked.size());
    uint64_t calls[2] = {0, 0};
    for (int sliced = 0; sliced < 2; ++sliced) {
      SCOPED_TRACE(sliced);
      Build(truths, SIZE_MAX, absl::Milliseconds(500));
      {  // (the cursor holds the export: gone before the registry)
        absl::StatusOr<TotalsCursor> c =
            PrepareTotals(*service_, Request(0, 0, asked));
        ASSERT_TRUE(c.ok()) << c.status();
        int steps = 0, early = 0;
        while (true) {
          ASSERT_LT(steps, 100000);
          ++steps;
          const uint64_t before = c->position();
          absl::StatusOr<bool> done =
              TotalsStep(service_.get(), &*c, Deadline(),
                         sliced ? absl::Now() + absl::Milliseconds(10)
                                : absl::InfiniteFuture());
          ASSERT_TRUE(done.ok()) << done.status();
          // Never a map in memory: at most a batch per context.
          if (asked.size() > 1) {
            ASSERT_LE(c->walk.merge->held(),
                      asked.size() * kTotalsBatchExtents + 1);
          }
          if (*done) break;
          if (c->position() == before) ++early;
        }
        if (sliced) {
          EXPECT_GT(early, 0);  // some slices ended while a fetch ran on
        } else {
          EXPECT_EQ(early, 0);
        }
        CheckAgainstModel(TotalsResponse(*c), 0, kSize, asked);
      }
      calls[sliced] = disk_->block_status_calls();
      service_.reset();
      cache_.reset();
      registry_.reset();  // joins the answer threads
    }
    // Waits that ended with a slice joined the fetch in flight: the first
    // step asked every window of each context at once (demand +
    // read-ahead) and nothing was asked again.
    EXPECT_EQ(calls[0], asked.size() * kSize / (64 * 1024));
    EXPECT_EQ(calls[1], calls[0]);
  }
}

TEST_F(TotalsTest, EmptyExportHasZeroTotals) {
  Build({{}}, SIZE_MAX, absl::ZeroDuration(), /*size=*/0);
  absl::StatusOr<v1::GetTotalsResponse> r =
      Totals(Request(0, 0, {0}), Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->length(), 0u);
  EXPECT_EQ(r->extents(), 0u);
  ASSERT_EQ(r->contexts_size(), 1);
  EXPECT_EQ(r->contexts(0).data() + r->contexts(0).hole(), 0u);
  EXPECT_EQ(r->contexts(0).by_flags_size(), 0);
  EXPECT_EQ(disk_->block_status_calls(), 0u);
}

TEST_F(TotalsTest, ManyDistinctFlagsTruncateOnlyTheHistogram) {
  // An upstream that sets undefined bits: 100 distinct flags values.
  ExtentList truth;
  for (uint32_t i = 0; i < 100; ++i) {
    truth.push_back({i * 1024, 1024, i});
  }
  truth.push_back({100 * 1024, kSize - 100 * 1024, 0});
  Build({truth});
  absl::StatusOr<v1::GetTotalsResponse> r =
      Totals(Request(0, 0, {0}), Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::ContextTotals& t = r->contexts(0);
  EXPECT_TRUE(t.by_flags_truncated());
  EXPECT_EQ(t.by_flags_size(), static_cast<int>(kMaxFlagValues));
  EXPECT_EQ(t.extents(), 101u);  // flags 0, 1, ..., 99, then 0 again
  uint64_t hole = 0, zero = 0;
  for (const Extent& e : truth) {
    if (e.flags & kStateHole) hole += e.length;
    if (e.flags & kStateZero) zero += e.length;
  }
  EXPECT_EQ(t.hole(), hole);
  EXPECT_EQ(t.data(), kSize - hole);
  EXPECT_EQ(t.zero(), zero);
}

TEST_F(TotalsTest, UpstreamErrorsAreFinalNeverPartialTotals) {
  std::mt19937_64 rng(3);
  Build({RandomTruth(&rng, false)});
  disk_->FailNextBlockStatus(1000, absl::DataLossError("EIO from the disk"));
  absl::StatusOr<v1::GetTotalsResponse> r =
      Totals(Request(0, 0, {0}), Deadline());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDataLoss)) << r.status();
}

TEST_F(TotalsTest, DeadlineSaysHowFarTheWalkGot) {
  std::mt19937_64 rng(4);
  Build({RandomTruth(&rng, false)}, SIZE_MAX, absl::Seconds(1));
  absl::StatusOr<v1::GetTotalsResponse> r =
      Totals(Request(0, 0, {0}), absl::Now() + absl::Milliseconds(50));
  ASSERT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded)) << r.status();
  EXPECT_NE(r.status().message().find("0 of 262144 bytes from offset 0"),
            absl::string_view::npos)
      << r.status();
  EXPECT_LT(r.status().message().size(), 512u);
}

TEST_F(TotalsTest, ValidationCodes) {
  Build({{{0, kSize, 0}}, {{0, kSize, 1}}});
  auto prepare = [&](const v1::GetTotalsRequest& r) {
    return PrepareTotals(*service_, r).status();
  };
  EXPECT_THAT(prepare(Request(0, 0, {0, 1})), StatusIs(absl::StatusCode::kOk));
  v1::GetTotalsRequest dup = Request(0, 0, {0});
  dup.add_contexts("");
  EXPECT_THAT(prepare(dup), StatusIs(absl::StatusCode::kInvalidArgument));
  v1::GetTotalsRequest many = Request(0, 0, {});
  for (int i = 0; i < 9; ++i) {
    many.add_contexts("qemu:dirty-bitmap:x" + std::to_string(i));
  }
  EXPECT_THAT(prepare(many), StatusIs(absl::StatusCode::kInvalidArgument));
  v1::GetTotalsRequest malformed = Request(0, 0, {});
  malformed.add_contexts("no-colon");
  EXPECT_THAT(prepare(malformed), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(prepare(Request(5, UINT64_MAX, {0})),
              StatusIs(absl::StatusCode::kInvalidArgument));
  v1::GetTotalsRequest mode = Request(0, 0, {0});
  mode.set_cache_mode(static_cast<v1::CacheMode>(42));
  EXPECT_THAT(prepare(mode), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(prepare(Request(kSize, 0, {0})),
              StatusIs(absl::StatusCode::kOutOfRange));
  v1::GetTotalsRequest missing = Request(0, 0, {0});
  missing.add_contexts("qemu:dirty-bitmap:nope");
  EXPECT_THAT(prepare(missing),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  v1::GetTotalsRequest unknown = Request(0, 0, {0});
  unknown.set_export_name("nope");
  EXPECT_THAT(prepare(unknown), StatusIs(absl::StatusCode::kNotFound));
  unknown.set_export_name(std::string(100000, 'x'));
  absl::Status s = PrepareTotals(*service_, unknown).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_LT(s.message().size(), 512u);
  disk_->set_ready(false);
  EXPECT_THAT(prepare(Request(0, 0, {0})),
              StatusIs(absl::StatusCode::kUnavailable));
}

}  // namespace
}  // namespace blockmeta
