// server/service/extent_service_test.cc — the service logic on a fake
// upstream: validation codes, cache modes, one-extent mode, streaming
// batches, invalidation and stats. (Real upstreams: tests/service/.)
#include "server/service/extent_service.h"

#include <memory>
#include <utility>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_upstream.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;

constexpr uint64_t kMiB = 1 << 20;
const char kBitmap[] = "qemu:dirty-bitmap:b1";

// 16 MiB disk: data, hole+zero, data, allocated zero, hole+zero.
ExtentList AllocationTruth() {
  return {{0, 1 * kMiB, 0},
          {1 * kMiB, 3 * kMiB, kStateHole | kStateZero},
          {4 * kMiB, 2 * kMiB, 0},
          {6 * kMiB, 2 * kMiB, kStateZero},
          {8 * kMiB, 8 * kMiB, kStateHole | kStateZero}};
}

ExtentList BitmapTruth() {
  return {{0, 2 * kMiB, 0},
          {2 * kMiB, 1 * kMiB, kStateDirty},
          {3 * kMiB, 13 * kMiB, 0}};
}

class ExtentServiceTest : public ::testing::Test {
 protected:
  ExtentServiceTest() {
    auto disk = std::make_unique<FakeUpstream>(16 * kMiB, 4096,
                                               /*with_bitmap=*/false);
    disk->SetContextTruth("base:allocation", AllocationTruth());
    disk->SetContextTruth(kBitmap, BitmapTruth());
    disk_ = disk.get();
    auto other = std::make_unique<FakeUpstream>(4 * kMiB, 4096,
                                                /*with_bitmap=*/false);
    other->SetContextTruth("base:allocation",
                           {{0, 4 * kMiB, kStateHole | kStateZero}});
    other_ = other.get();
    std::vector<std::pair<v1::ExportConfig, std::unique_ptr<Upstream>>> exports;
    v1::ExportConfig c1;
    c1.set_name("disk");
    exports.emplace_back(c1, std::move(disk));
    v1::ExportConfig c2;
    c2.set_name("other");
    exports.emplace_back(c2, std::move(other));
    registry_ = ExportRegistry::FromUpstreams(std::move(exports));
    cache_ = std::make_unique<ExtentCache>(ExtentCache::Options{});
    service_ = std::make_unique<ExtentService>(registry_.get(), cache_.get(),
                                               ExtentService::Options{});
  }

  absl::StatusOr<v1::GetExtentsResponse> Get(const v1::GetExtentsRequest& req) {
    absl::StatusOr<ExtentService::Query> q = service_->PrepareExtents(req);
    if (!q.ok()) return q.status();
    return service_->Answer(*q, absl::Now() + absl::Seconds(10));
  }

  static v1::GetExtentsRequest Req(uint64_t offset, uint64_t length,
                                   const std::string& name = "disk") {
    v1::GetExtentsRequest r;
    r.set_export_name(name);
    r.set_offset(offset);
    r.set_length(length);
    return r;
  }

  static ExtentList FromProto(const v1::GetExtentsResponse& r) {
    ExtentList out;
    for (const v1::Extent& e : r.extents()) {
      out.push_back({e.offset(), e.length(), e.nbd_flags()});
    }
    return out;
  }

  FakeUpstream* disk_;
  FakeUpstream* other_;
  std::unique_ptr<ExportRegistry> registry_;
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<ExtentService> service_;
};

TEST_F(ExtentServiceTest, ValidationErrorsHavePreciseCodes) {
  EXPECT_THAT(Get(Req(0, 1, "nope")), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(Get(Req(0, 1, "")), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Get(Req(0, 0)), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Get(Req(5, ~0ull)), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Get(Req(16 * kMiB, 1)), StatusIs(absl::StatusCode::kOutOfRange));
  v1::GetExtentsRequest bad_ctx = Req(0, 1);
  bad_ctx.set_context("qemu:dirty-bitmap:missing");
  absl::Status s = Get(bad_ctx).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(s.message().find("qemu:dirty-bitmap:b1"), absl::string_view::npos)
      << "the error lists what is offered: " << s;
  bad_ctx.set_context("nocolon");
  EXPECT_THAT(Get(bad_ctx), StatusIs(absl::StatusCode::kInvalidArgument));
  v1::GetExtentsRequest bad_mode = Req(0, 1);
  bad_mode.set_cache_mode(static_cast<v1::CacheMode>(42));
  EXPECT_THAT(Get(bad_mode), StatusIs(absl::StatusCode::kInvalidArgument));
  disk_->set_ready(false);
  EXPECT_THAT(Get(Req(0, 1)), StatusIs(absl::StatusCode::kUnavailable));
}

// Oversized names: INVALID_ARGUMENT, the message quoting a bounded prefix.
TEST_F(ExtentServiceTest, OversizedNamesAreRefusedWithBoundedMessages) {
  const std::string huge_name(15 << 20, 'n');
  auto s = Get(Req(0, 1, huge_name)).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_LT(s.message().size(), 200u) << s.message().substr(0, 300);
  EXPECT_THAT(Get(Req(0, 1, std::string(257, 'n'))),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      Get(Req(0, 1, std::string(256, 'n'))),
      StatusIs(absl::StatusCode::kNotFound));  // allowed length, no such export
  v1::GetExtentsRequest r = Req(0, 1);
  r.set_context("qemu:" + std::string(8 << 20, 'c'));
  s = Get(r).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_LT(s.message().size(), 200u);
  r.set_context(std::string(4000, 'c'));  // no colon: malformed
  s = Get(r).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_LT(s.message().size(), 200u);
}

TEST_F(ExtentServiceTest, AnswersTheTruthAndThenHitsTheCache) {
  absl::StatusOr<v1::GetExtentsResponse> r = Get(Req(0, 16 * kMiB));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r), AllocationTruth());
  EXPECT_EQ(r->next_offset(), 16 * kMiB);
  EXPECT_EQ(r->export_size(), 16 * kMiB);
  EXPECT_EQ(r->context(), "base:allocation");
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_MISS);
  EXPECT_TRUE(r->extents(1).hole());
  EXPECT_TRUE(r->extents(1).zero());
  EXPECT_FALSE(r->extents(3).hole());
  EXPECT_TRUE(r->extents(3).zero());
  uint64_t calls = disk_->block_status_calls();

  absl::StatusOr<ExtentService::Query> q =
      service_->PrepareExtents(Req(512 * 1024, 5 * kMiB));
  ASSERT_TRUE(q.ok());
  std::optional<v1::GetExtentsResponse> hit = service_->TryAnswerFromCache(*q);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(FromProto(*hit),
            (ExtentList{{512 * 1024, 512 * 1024, 0},
                        {1 * kMiB, 3 * kMiB, kStateHole | kStateZero},
                        {4 * kMiB, 1536 * 1024, 0}}));
  EXPECT_EQ(disk_->block_status_calls(), calls);
}

TEST_F(ExtentServiceTest, LengthPastTheEndIsClipped) {
  absl::StatusOr<v1::GetExtentsResponse> r = Get(Req(15 * kMiB, 100 * kMiB));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r),
            (ExtentList{{15 * kMiB, kMiB, kStateHole | kStateZero}}));
  EXPECT_EQ(r->next_offset(), 16 * kMiB);
}

TEST_F(ExtentServiceTest, OneExtentAndMaxExtents) {
  v1::GetExtentsRequest one = Req(0, 16 * kMiB);
  one.set_one_extent(true);
  absl::StatusOr<v1::GetExtentsResponse> r = Get(one);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r), (ExtentList{{0, kMiB, 0}}));
  EXPECT_EQ(r->next_offset(), kMiB);

  v1::GetExtentsRequest two = Req(0, 16 * kMiB);
  two.set_max_extents(2);
  r = Get(two);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->extents_size(), 2);
  EXPECT_EQ(r->next_offset(), 4 * kMiB);
}

TEST_F(ExtentServiceTest, BypassNeverTouchesTheCacheRefreshRefills) {
  v1::GetExtentsRequest bypass = Req(0, 16 * kMiB);
  bypass.set_cache_mode(v1::CACHE_MODE_BYPASS);
  absl::StatusOr<v1::GetExtentsResponse> r = Get(bypass);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r), AllocationTruth());
  EXPECT_EQ(r->cache_outcome(), v1::CACHE_OUTCOME_BYPASS);
  absl::StatusOr<ExtentService::Query> q =
      service_->PrepareExtents(Req(0, 16 * kMiB));
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(service_->TryAnswerFromCache(*q).has_value());

  ASSERT_TRUE(Get(Req(0, 16 * kMiB)).ok());  // fills
  ASSERT_TRUE(service_->TryAnswerFromCache(*q).has_value());
  // The disk changes behind our back; refresh sees it and re-caches.
  disk_->SetContextTruth("base:allocation", {{0, 16 * kMiB, 0}});
  uint64_t calls = disk_->block_status_calls();
  v1::GetExtentsRequest refresh = Req(0, 16 * kMiB);
  refresh.set_cache_mode(v1::CACHE_MODE_REFRESH);
  r = Get(refresh);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(disk_->block_status_calls(), calls);
  EXPECT_EQ(FromProto(*r), (ExtentList{{0, 16 * kMiB, 0}}));
  std::optional<v1::GetExtentsResponse> hit = service_->TryAnswerFromCache(*q);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(FromProto(*hit), (ExtentList{{0, 16 * kMiB, 0}}));
}

TEST_F(ExtentServiceTest, ShortUpstreamRepliesAreStitchedTogether) {
  disk_->SetReplyExtentsMax(1);  // like a REQ_ONE-minded server
  absl::StatusOr<v1::GetExtentsResponse> r = Get(Req(0, 16 * kMiB));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r), AllocationTruth());
}

TEST_F(ExtentServiceTest, DirtyBitmapFlagsAreTyped) {
  v1::GetExtentsRequest req = Req(0, 16 * kMiB);
  req.set_context(kBitmap);
  absl::StatusOr<v1::GetExtentsResponse> r = Get(req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r), BitmapTruth());
  EXPECT_FALSE(r->extents(0).dirty());
  EXPECT_TRUE(r->extents(1).dirty());
  EXPECT_FALSE(r->extents(1).hole()) << "hole means nothing for a bitmap";
}

TEST_F(ExtentServiceTest, ExportsAndContextsAreIsolated) {
  ASSERT_TRUE(Get(Req(0, 16 * kMiB)).ok());
  absl::StatusOr<v1::GetExtentsResponse> r = Get(Req(0, 4 * kMiB, "other"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(FromProto(*r),
            (ExtentList{{0, 4 * kMiB, kStateHole | kStateZero}}));
  v1::GetExtentsRequest bm = Req(0, 16 * kMiB);
  bm.set_context(kBitmap);
  r = Get(bm);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(FromProto(*r), BitmapTruth());
}

TEST_F(ExtentServiceTest, UpstreamErrorsPropagate) {
  disk_->FailNextBlockStatus(1, absl::UnavailableError("connection reset"));
  absl::Status s = Get(Req(0, kMiB)).status();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(Get(Req(0, kMiB)).ok()) << "next call goes through";
}

TEST_F(ExtentServiceTest, StreamBatchesTileTheRange) {
  v1::MapExtentsRequest req;
  req.set_export_name("disk");
  req.set_batch_size(2);
  req.set_coalesce(true);
  absl::StatusOr<ExtentService::Cursor> c = service_->PrepareMap(req);
  ASSERT_TRUE(c.ok()) << c.status();
  ExtentList all;
  int batches = 0;
  uint64_t expect_next = 0;
  while (true) {
    absl::StatusOr<ExtentService::Batch> b =
        service_->NextBatch(&*c, absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(b.ok()) << b.status();
    if (!b->extents.empty()) {
      EXPECT_EQ(b->extents.front().offset, expect_next);
      EXPECT_LE(b->extents.size(), 2u);
    }
    expect_next = b->next_offset;
    all.insert(all.end(), b->extents.begin(), b->extents.end());
    ++batches;
    if (b->done) break;
    ASSERT_LT(batches, 100);
  }
  EXPECT_EQ(all, AllocationTruth());
  EXPECT_EQ(expect_next, 16 * kMiB);
}

TEST_F(ExtentServiceTest, InvalidateMakesTheNextQueryAskUpstream) {
  ASSERT_TRUE(Get(Req(0, 16 * kMiB)).ok());
  v1::InvalidateCacheRequest inv;
  inv.set_export_name("disk");
  inv.set_offset(2 * kMiB);
  inv.set_length(kMiB);
  absl::StatusOr<v1::InvalidateCacheResponse> d =
      service_->InvalidateCache(inv);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_GE(d->extents_dropped(), 1u);
  EXPECT_EQ(d->bytes_dropped(), kMiB);
  absl::StatusOr<ExtentService::Query> q =
      service_->PrepareExtents(Req(0, 16 * kMiB));
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(service_->TryAnswerFromCache(*q).has_value());
  inv.set_export_name("nope");
  EXPECT_THAT(service_->InvalidateCache(inv),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(ExtentServiceTest, StatsCountHitsAndUpstreamCalls) {
  ASSERT_TRUE(Get(Req(0, 16 * kMiB)).ok());
  absl::StatusOr<ExtentService::Query> q =
      service_->PrepareExtents(Req(0, 16 * kMiB));
  ASSERT_TRUE(q.ok());
  ASSERT_TRUE(service_->TryAnswerFromCache(*q).has_value());
  absl::StatusOr<v1::GetStatsResponse> s = service_->GetStats({});
  ASSERT_TRUE(s.ok());
  EXPECT_GE(s->total().hits(), 1u);
  EXPECT_GE(s->total().upstream_calls(), 1u);
  ASSERT_EQ(s->exports_size(), 2);
  EXPECT_EQ(s->exports(0).export_name(), "disk");
  EXPECT_EQ(s->exports(0).upstream_calls(), disk_->block_status_calls());
  v1::GetStatsRequest bad;
  bad.set_export_name("nope");
  EXPECT_THAT(service_->GetStats(bad), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(ExtentServiceTest, ListAndInfo) {
  absl::StatusOr<v1::ListExportsResponse> l = service_->ListExports();
  ASSERT_TRUE(l.ok());
  ASSERT_EQ(l->exports_size(), 2);
  EXPECT_EQ(l->exports(0).name(), "disk");
  EXPECT_EQ(l->exports(0).state(), v1::EXPORT_STATE_READY);
  EXPECT_EQ(l->exports(0).size(), 16 * kMiB);
  v1::GetExportInfoRequest req;
  req.set_export_name("disk");
  absl::StatusOr<v1::ExportInfo> info = service_->GetExportInfo(req);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->size(), 16 * kMiB);
  EXPECT_EQ(info->metadata_contexts_size(), 2);
  req.set_export_name("zzz");
  EXPECT_THAT(service_->GetExportInfo(req),
              StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace blockmeta
