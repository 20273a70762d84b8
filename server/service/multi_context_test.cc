// server/service/multi_context_test.cc — several contexts at once on a
// fake upstream: answers match a per-byte model of every context, each
// context is cached on its own key (a repeat is a hit, a one-context query
// afterwards is a hit), the stream holds at most a batch per context, and
// every validation error has its code.
#include "server/service/multi_context.h"

#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_upstream.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

constexpr uint64_t kSize = 256 * 1024;
const char* const kContexts[] = {"base:allocation", "qemu:dirty-bitmap:a",
                                 "qemu:dirty-bitmap:b"};

absl::Time Deadline() { return absl::Now() + absl::Seconds(10); }

ExtentList RandomTruth(std::mt19937_64* rng, bool dirty) {
  ExtentList out;
  for (uint64_t off = 0; off < kSize;) {
    uint64_t len = std::min<uint64_t>(kSize - off, 1 + (*rng)() % 9000);
    uint32_t f = dirty ? static_cast<uint32_t>((*rng)() % 2)
                       : static_cast<uint32_t>((*rng)() % 4);
    out.push_back({off, len, f});
    off += len;
  }
  return out;
}

class MultiContextTest : public ::testing::Test {
 protected:
  void Build(std::vector<ExtentList> truths, size_t reply_max = SIZE_MAX) {
    auto disk = std::make_unique<FakeUpstream>(kSize, 512, false);
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
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options{});
    service_ = std::make_unique<ExtentService>(registry_.get(), cache_.get(),
                                               ExtentService::Options{});
  }

  // Per byte, per context: the truth.
  uint32_t Truth(size_t ctx, uint64_t byte) const {
    for (const Extent& e : truths_[ctx]) {
      if (byte >= e.offset && byte < e.end()) return e.flags;
    }
    ADD_FAILURE() << "no truth at " << byte;
    return 0;
  }

  void CheckAgainstModel(const std::vector<MergedExtent>& got, uint64_t start,
                         uint64_t end, size_t n) {
    uint64_t pos = start;
    for (const MergedExtent& m : got) {
      ASSERT_EQ(m.offset, pos);
      ASSERT_GT(m.length, 0u);
      for (uint64_t b = m.offset; b < m.end(); ++b) {
        for (size_t i = 0; i < n; ++i) {
          ASSERT_EQ(m.flags[i], Truth(i, b)) << "byte " << b << " ctx " << i;
        }
      }
      pos = m.end();
    }
    ASSERT_EQ(pos, end);
  }

  static v1::GetExtentsRequest Get(uint64_t off, uint64_t len, size_t n) {
    v1::GetExtentsRequest r;
    r.set_export_name("disk");
    r.set_offset(off);
    r.set_length(len);
    r.set_max_extents(65536);
    for (size_t i = 0; i < n; ++i) r.add_contexts(kContexts[i]);
    return r;
  }

  FakeUpstream* disk_ = nullptr;
  std::vector<ExtentList> truths_;
  std::unique_ptr<ExportRegistry> registry_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<ExtentService> service_;
};

TEST_F(MultiContextTest, StreamsMatchAPerByteModel) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 30; ++round) {
    size_t n = 1 + round % 3;
    std::vector<ExtentList> truths;
    for (size_t i = 0; i < n; ++i) truths.push_back(RandomTruth(&rng, i > 0));
    Build(truths, /*reply_max=*/1 + rng() % 9);
    v1::MapExtentsRequest req;
    req.set_export_name("disk");
    uint64_t start = rng() % (kSize / 2);
    req.set_offset(start);
    req.set_batch_size(1 + rng() % 6);
    req.set_coalesce(rng() % 2 == 0);
    for (size_t i = 0; i < n; ++i) req.add_contexts(kContexts[i]);
    absl::StatusOr<MultiCursor> c = PrepareMultiMap(*service_, req);
    ASSERT_TRUE(c.ok()) << c.status();
    std::vector<MergedExtent> all;
    for (int guard = 0;; ++guard) {
      ASSERT_LT(guard, 1000000);
      absl::StatusOr<MergedBatch> b =
          NextMerged(service_.get(), &*c, Deadline());
      ASSERT_TRUE(b.ok()) << b.status();
      ASSERT_LE(b->extents.size(), req.batch_size());
      // Never a whole map: at most one batch per context (each input batch
      // is at most batch_size extents) plus the open extent.
      ASSERT_LE(c->merge->held(), n * req.batch_size() + 1);
      all.insert(all.end(), b->extents.begin(), b->extents.end());
      if (b->done) break;
      ASSERT_FALSE(b->extents.empty());
    }
    CheckAgainstModel(all, start, kSize, n);
    if (HasFatalFailure()) FAIL() << "round " << round;
  }
}

TEST_F(MultiContextTest, EachContextIsCachedOnItsOwnKey) {
  std::mt19937_64 rng(11);
  Build({RandomTruth(&rng, false), RandomTruth(&rng, true)});
  absl::StatusOr<MultiCursor> c =
      PrepareMultiExtents(*service_, Get(0, kSize, 2));
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<v1::GetExtentsResponse> r =
      AnswerMulti(service_.get(), &*c, Deadline());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_MISS);
  ASSERT_EQ(r->contexts_size(), 2);
  EXPECT_EQ(r->contexts(1), kContexts[1]);
  const uint64_t calls = disk_->block_status_calls();
  EXPECT_EQ(calls, 2u);  // one window per context
  // Summary fields and per-context flags agree with the truth.
  for (const v1::Extent& e : r->extents()) {
    ASSERT_EQ(e.contexts_size(), 2);
    uint32_t a = Truth(0, e.offset()), d = Truth(1, e.offset());
    EXPECT_EQ(e.contexts(0).nbd_flags(), a);
    EXPECT_EQ(e.contexts(0).hole(), (a & kStateHole) != 0);
    EXPECT_EQ(e.contexts(0).zero(), (a & kStateZero) != 0);
    EXPECT_EQ(e.contexts(1).dirty(), (d & kStateDirty) != 0);
    EXPECT_EQ(e.zero(), e.contexts(0).zero());
    EXPECT_EQ(e.dirty(), e.contexts(1).dirty());
    EXPECT_EQ(e.nbd_flags(), a);
  }
  // Again: both from the cache.
  c = PrepareMultiExtents(*service_, Get(0, kSize, 2));
  ASSERT_TRUE(c.ok());
  r = AnswerMulti(service_.get(), &*c, Deadline());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(disk_->block_status_calls(), calls);
  // A one-context query of either is a hit on its own key.
  for (int i = 0; i < 2; ++i) {
    v1::GetExtentsRequest one;
    one.set_export_name("disk");
    one.set_context(kContexts[i]);
    one.set_offset(0);
    one.set_length(kSize);
    absl::StatusOr<ExtentService::Query> q = service_->PrepareExtents(one);
    ASSERT_TRUE(q.ok());
    EXPECT_TRUE(service_->TryAnswerFromCache(*q).has_value()) << i;
  }
  EXPECT_EQ(disk_->block_status_calls(), calls);
}

TEST_F(MultiContextTest, OneExtentIsTheFirstMergedRun) {
  Build({{{0, 1000, 0}, {1000, kSize - 1000, 3}},
         {{0, 300, 1}, {300, kSize - 300, 0}}});
  v1::GetExtentsRequest req = Get(0, kSize, 2);
  req.set_one_extent(true);
  absl::StatusOr<MultiCursor> c = PrepareMultiExtents(*service_, req);
  ASSERT_TRUE(c.ok());
  absl::StatusOr<v1::GetExtentsResponse> r =
      AnswerMulti(service_.get(), &*c, Deadline());
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->extents_size(), 1);
  EXPECT_EQ(r->extents(0).length(), 300u);
  EXPECT_EQ(r->next_offset(), 300u);
}

TEST_F(MultiContextTest, ValidationCodes) {
  Build({{{0, kSize, 0}}, {{0, kSize, 0}}});
  auto code = [&](const v1::GetExtentsRequest& r) {
    return PrepareMultiExtents(*service_, r).status().code();
  };
  v1::GetExtentsRequest both = Get(0, 10, 2);
  both.set_context("base:allocation");
  EXPECT_EQ(code(both), absl::StatusCode::kInvalidArgument);
  v1::GetExtentsRequest dup = Get(0, 10, 1);
  dup.add_contexts("");  // "" is base:allocation again
  EXPECT_EQ(code(dup), absl::StatusCode::kInvalidArgument);
  v1::GetExtentsRequest many = Get(0, 10, 0);
  for (int i = 0; i < 9; ++i)
    many.add_contexts("qemu:dirty-bitmap:x" + std::to_string(i));
  EXPECT_EQ(code(many), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Get(0, 0, 2)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Get(kSize, 10, 2)), absl::StatusCode::kOutOfRange);
  v1::GetExtentsRequest missing = Get(0, 10, 1);
  missing.add_contexts("qemu:dirty-bitmap:nope");
  EXPECT_EQ(code(missing), absl::StatusCode::kFailedPrecondition);
  v1::GetExtentsRequest unknown = Get(0, 10, 2);
  unknown.set_export_name("nope");
  EXPECT_EQ(code(unknown), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace blockmeta
