// tests/service/grpc_service_test.cc — the gRPC services end to end: a real
// BlockMetaServer on a loopback port, real upstreams (nbdkit data/delay
// plugins, qemu-nbd on a qcow2 with a dirty bitmap), real channels. Answers
// are compared with `nbdinfo --map` on the same upstream.

#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::Eventually;
using ::blockmeta::testing::HttpGet;
using ::blockmeta::testing::LoopbackChannel;
using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::MergeAdjacent;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::StartServer;
using ::blockmeta::testing::TempDir;
using ::blockmeta::testing::WaitExportsReady;

constexpr uint64_t kMiB = 1 << 20;

ExtentList FromProto(const google::protobuf::RepeatedPtrField<v1::Extent>& r) {
  ExtentList out;
  for (const v1::Extent& e : r) {
    out.push_back({e.offset(), e.length(), e.nbd_flags()});
  }
  return out;
}

class GrpcServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir();
    // A 64 MiB sparse disk with data at a few places (nbdkit data plugin).
    auto data = NbdProcess::Start(
        {"nbdkit", "-U", "{sock}", "-f", "data",
         "data=@1048576 1 2 3 @4194304 (0x55)*65536 @33554432 (0xaa)*1048576",
         "size=64M"});
    ASSERT_TRUE(data.ok()) << data.status();
    data_ = data->release();
    // The same kind of disk behind a slow extents call.
    auto slow =
        NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "--filter=delay",
                           "data", "data=@1048576 1 @8388608 (0x11)*4096",
                           "size=16M", "delay-extents=3"});
    ASSERT_TRUE(slow.ok()) << slow.status();
    slow_ = slow->release();
    // The first disk again behind a 50 ms extents delay: mixed hits and
    // misses under concurrency.
    auto slowish = NbdProcess::Start(
        {"nbdkit", "-U", "{sock}", "-f", "--filter=delay", "data",
         "data=@1048576 1 2 3 @4194304 (0x55)*65536 @33554432 (0xaa)*1048576",
         "size=64M", "delay-extents=50ms"});
    ASSERT_TRUE(slowish.ok()) << slowish.status();
    slowish_ = slowish->release();
    // A qcow2 image with a persistent dirty bitmap b1 and writes after it.
    std::string img = tmp_->File("disk.qcow2");
    ASSERT_TRUE(MakeImage(img, "qcow2", 32 * kMiB,
                          {"write -P 0x1 0 1M", "write -P 0x2 8M 2M"})
                    .ok());
    auto bitmap = ::blockmeta::testing::RunCommand(
        {"qemu-img", "bitmap", "--add", img, "b1"});
    ASSERT_TRUE(bitmap.ok()) << bitmap.status();
    ASSERT_TRUE(
        QemuIo(img, "qcow2", {"write -P 0x3 4M 64k", "write -P 0x4 20M 1M"})
            .ok());
    auto q = NbdProcess::Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2",
                                "--persistent", "--shared=8", "-B", "b1", "-r",
                                img});
    ASSERT_TRUE(q.ok()) << q.status();
    qcow_ = q->release();

    v1::ServerConfig config;
    config.set_grpc_listen("127.0.0.1:0");
    config.set_metrics_listen("127.0.0.1:0");
    config.mutable_grpc()->set_max_inflight_calls(64);
    auto add = [&](const std::string& name, const std::string& uri) {
      v1::ExportConfig* e = config.add_exports();
      e->set_name(name);
      e->set_nbd_uri(uri);
      e->set_connections(4);
    };
    add("data", data_->uri());
    add("slow", slow_->uri());
    add("qcow", qcow_->uri());
    add("slowish", slowish_->uri());
    auto server = StartServer(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    channel_ = new std::shared_ptr<grpc::Channel>(LoopbackChannel(*server_));
    // Wait until every upstream is connected.
    absl::Status ready = WaitExportsReady(*channel_, 4);
    ASSERT_TRUE(ready.ok()) << ready;
  }

  static void TearDownTestSuite() {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(1));
    delete server_;
    delete channel_;
    delete data_;
    delete slow_;
    delete qcow_;
    delete slowish_;
    delete tmp_;
  }

  std::unique_ptr<v1::BlockMeta::Stub> Stub() {
    return v1::BlockMeta::NewStub(*channel_);
  }

  static grpc::Status GetExtents(const v1::GetExtentsRequest& req,
                                 v1::GetExtentsResponse* resp,
                                 absl::Duration deadline = absl::Seconds(20)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    return v1::BlockMeta::NewStub(*channel_)->GetExtents(&ctx, req, resp);
  }

  static v1::GetExtentsRequest Req(const std::string& name, uint64_t offset,
                                   uint64_t length) {
    v1::GetExtentsRequest r;
    r.set_export_name(name);
    r.set_offset(offset);
    r.set_length(length);
    return r;
  }

  static ExtentList MapAll(const std::string& name, const std::string& context,
                           uint32_t batch = 0) {
    grpc::ClientContext ctx;
    v1::MapExtentsRequest req;
    req.set_export_name(name);
    req.set_context(context);
    req.set_batch_size(batch);
    req.set_coalesce(true);
    auto reader = v1::BlockMeta::NewStub(*channel_)->MapExtents(&ctx, req);
    v1::MapExtentsResponse msg;
    ExtentList out;
    while (reader->Read(&msg)) {
      ExtentList part = FromProto(msg.extents());
      if (!part.empty() && !out.empty()) {
        EXPECT_EQ(part.front().offset, out.back().end()) << "contiguous";
      }
      out.insert(out.end(), part.begin(), part.end());
    }
    grpc::Status s = reader->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return MergeAdjacent(out);
  }

  static TempDir* tmp_;
  static NbdProcess* data_;
  static NbdProcess* slow_;
  static NbdProcess* qcow_;
  static NbdProcess* slowish_;
  static BlockMetaServer* server_;
  static std::shared_ptr<grpc::Channel>* channel_;
};

TempDir* GrpcServiceTest::tmp_ = nullptr;
NbdProcess* GrpcServiceTest::data_ = nullptr;
NbdProcess* GrpcServiceTest::slow_ = nullptr;
NbdProcess* GrpcServiceTest::qcow_ = nullptr;
NbdProcess* GrpcServiceTest::slowish_ = nullptr;
BlockMetaServer* GrpcServiceTest::server_ = nullptr;
std::shared_ptr<grpc::Channel>* GrpcServiceTest::channel_ = nullptr;

TEST_F(GrpcServiceTest, ListAndInfo) {
  grpc::ClientContext ctx;
  v1::GetExportInfoRequest req;
  req.set_export_name("qcow");
  v1::ExportInfo info;
  ASSERT_TRUE(Stub()->GetExportInfo(&ctx, req, &info).ok());
  EXPECT_EQ(info.size(), 32 * kMiB);
  EXPECT_TRUE(info.read_only());
  EXPECT_EQ(info.state(), v1::EXPORT_STATE_READY);
  std::vector<std::string> contexts(info.metadata_contexts().begin(),
                                    info.metadata_contexts().end());
  EXPECT_NE(std::find(contexts.begin(), contexts.end(), "base:allocation"),
            contexts.end());
  EXPECT_NE(std::find(contexts.begin(), contexts.end(), "qemu:dirty-bitmap:b1"),
            contexts.end());
}

TEST_F(GrpcServiceTest, GetExtentsEqualsNbdinfoAndThenHits) {
  absl::StatusOr<ExtentList> truth = NbdinfoMap(data_->uri());
  ASSERT_TRUE(truth.ok()) << truth.status();
  v1::GetExtentsResponse r;
  v1::GetExtentsRequest req = Req("data", 0, 64 * kMiB);
  req.set_cache_mode(v1::CACHE_MODE_REFRESH);
  ASSERT_TRUE(GetExtents(req, &r).ok());
  EXPECT_EQ(FromProto(r.extents()), MergeAdjacent(*truth));
  EXPECT_EQ(r.next_offset(), 64 * kMiB);
  v1::GetExtentsResponse again;
  ASSERT_TRUE(GetExtents(Req("data", 0, 64 * kMiB), &again).ok());
  EXPECT_EQ(again.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(FromProto(again.extents()), MergeAdjacent(*truth));
}

TEST_F(GrpcServiceTest, MapExtentsEqualsNbdinfoForAllocationAndBitmap) {
  for (uint32_t batch : {0u, 1u, 3u}) {
    absl::StatusOr<ExtentList> truth = NbdinfoMap(qcow_->uri());
    ASSERT_TRUE(truth.ok()) << truth.status();
    EXPECT_EQ(MapAll("qcow", "", batch), MergeAdjacent(*truth))
        << "batch " << batch;
    absl::StatusOr<ExtentList> dirty =
        NbdinfoMap(qcow_->uri(), "qemu:dirty-bitmap:b1");
    ASSERT_TRUE(dirty.ok()) << dirty.status();
    ExtentList got = MapAll("qcow", "qemu:dirty-bitmap:b1", batch);
    EXPECT_EQ(got, MergeAdjacent(*dirty)) << "batch " << batch;
  }
  // The bitmap really shows the writes made after it was added.
  ExtentList dirty = MapAll("qcow", "qemu:dirty-bitmap:b1");
  bool saw_4m = false, saw_20m = false;
  for (const Extent& e : dirty) {
    if (e.flags & kStateDirty) {
      saw_4m |= e.offset <= 4 * kMiB && e.end() > 4 * kMiB;
      saw_20m |= e.offset <= 20 * kMiB && e.end() > 20 * kMiB;
      EXPECT_FALSE(e.offset < 1 * kMiB) << "written before the bitmap";
    }
  }
  EXPECT_TRUE(saw_4m && saw_20m);
}

TEST_F(GrpcServiceTest, BadInputGetsPreciseCodes) {
  v1::GetExtentsResponse r;
  EXPECT_THAT(GetExtents(Req("nope", 0, 1), &r),
              StatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(GetExtents(Req("data", 64 * kMiB, 1), &r),
              StatusIs(grpc::StatusCode::OUT_OF_RANGE));
  EXPECT_THAT(GetExtents(Req("data", 0, 0), &r),
              StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_THAT(GetExtents(Req("data", 10, ~0ull), &r),
              StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  v1::GetExtentsRequest ctx = Req("data", 0, 1);
  ctx.set_context("qemu:dirty-bitmap:none");
  grpc::Status s = GetExtents(ctx, &r);
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_NE(s.error_message().find("base:allocation"), std::string::npos);
  ctx.set_context("garbage");
  EXPECT_THAT(GetExtents(ctx, &r),
              StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  // Streams validate the same way.
  grpc::ClientContext c;
  v1::MapExtentsRequest m;
  m.set_export_name("data");
  m.set_offset(1ull << 40);
  auto reader = Stub()->MapExtents(&c, m);
  v1::MapExtentsResponse msg;
  EXPECT_FALSE(reader->Read(&msg));
  EXPECT_THAT(reader->Finish(), StatusIs(grpc::StatusCode::OUT_OF_RANGE));
}

TEST_F(GrpcServiceTest, DeadlineIsHonouredWithASlowUpstream) {
  v1::GetExtentsResponse r;
  v1::GetExtentsRequest req = Req("slow", 0, 16 * kMiB);
  req.set_cache_mode(v1::CACHE_MODE_BYPASS);
  absl::Time start = absl::Now();
  grpc::Status s = GetExtents(req, &r, absl::Milliseconds(500));
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::DEADLINE_EXCEEDED));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  // The export keeps working afterwards (the busy connection was replaced).
  req.set_cache_mode(v1::CACHE_MODE_USE);
  s = GetExtents(req, &r, absl::Seconds(30));
  EXPECT_TRUE(s.ok()) << s.error_message();
}

TEST_F(GrpcServiceTest, CacheHitsDoNotWaitForASlowMiss) {
  // Warm one range, then start a slow miss elsewhere and check a hit is fast.
  v1::GetExtentsResponse r;
  ASSERT_TRUE(GetExtents(Req("data", 0, 64 * kMiB), &r).ok());
  const double sent =
      ::blockmeta::testing::UpstreamCommandsSent(*server_, "slow");
  std::thread slow([&] {
    v1::GetExtentsResponse sr;
    v1::GetExtentsRequest req = Req("slow", 0, 16 * kMiB);
    req.set_cache_mode(v1::CACHE_MODE_BYPASS);
    (void)GetExtents(req, &sr, absl::Seconds(30));
  });
  // The miss is at the upstream (and stays there for 3 s).
  absl::Status waiting =
      ::blockmeta::testing::WaitUpstreamCommandsSent(*server_, "slow", sent);
  EXPECT_TRUE(waiting.ok()) << waiting;
  absl::Time start = absl::Now();
  ASSERT_TRUE(GetExtents(Req("data", 0, 64 * kMiB), &r).ok());
  EXPECT_EQ(r.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  // The slow miss takes 3 s; the hit must not wait for it.
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  slow.join();
}

TEST_F(GrpcServiceTest, ConcurrentMissesShareOneUpstreamCall) {
  // "slow" answers extents in 3 s. Eight clients miss the same range at
  // once: one upstream call, the others wait for it (single flight).
  auto stats = [&]() {
    grpc::ClientContext ctx;
    v1::GetStatsRequest req;
    req.set_export_name("slow");
    v1::GetStatsResponse r;
    EXPECT_TRUE(Stub()->GetStats(&ctx, req, &r).ok());
    return r;
  };
  {
    grpc::ClientContext ctx;
    v1::InvalidateCacheRequest inv;
    inv.set_export_name("slow");
    v1::InvalidateCacheResponse ir;
    ASSERT_TRUE(Stub()->InvalidateCache(&ctx, inv, &ir).ok());
  }
  const uint64_t calls_before = stats().exports(0).upstream_calls();
  std::atomic<int> ok{0};
  constexpr int kCallers = 8;
  std::vector<std::thread> threads;
  threads.reserve(kCallers);
  for (int i = 0; i < kCallers; ++i) {
    threads.emplace_back([&] {
      v1::GetExtentsResponse r;
      if (GetExtents(Req("slow", 0, 16 * kMiB), &r, absl::Seconds(30)).ok() &&
          r.next_offset() == 16 * kMiB) {
        ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kCallers);
  v1::GetStatsResponse after = stats();
  EXPECT_EQ(after.exports(0).upstream_calls() - calls_before, 1u);
  EXPECT_GE(after.total().coalesced_waits(), 1u);
}

TEST_F(GrpcServiceTest, ManyConcurrentClientsGetTheTruth) {
  // Both exports serve the same layout; "slowish" answers extents in 50 ms,
  // so calls mix cache hits, coalesced misses and slow misses.
  absl::StatusOr<ExtentList> truth_or = NbdinfoMap(data_->uri());
  ASSERT_TRUE(truth_or.ok());
  const ExtentList truth = MergeAdjacent(*truth_or);
  absl::StatusOr<ExtentList> slow_truth = NbdinfoMap(slowish_->uri());
  ASSERT_TRUE(slow_truth.ok());
  ASSERT_EQ(MergeAdjacent(*slow_truth), truth);
  std::atomic<int> wrong{0}, errors{0};
  constexpr int kThreads = 12;
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 60; ++i) {
        const std::string name = (rng() % 2) ? "slowish" : "data";
        uint64_t off = rng() % (64 * kMiB);
        uint64_t len = 1 + rng() % (8 * kMiB);
        v1::GetExtentsRequest req = Req(name, off, len);
        int mode = static_cast<int>(rng() % 10);
        if (mode == 0) req.set_cache_mode(v1::CACHE_MODE_BYPASS);
        if (mode == 1) req.set_cache_mode(v1::CACHE_MODE_REFRESH);
        if (mode == 2) req.set_one_extent(true);
        if (mode == 3) {
          grpc::ClientContext ictx;
          v1::InvalidateCacheRequest inv;
          inv.set_export_name(name);
          inv.set_offset(off);
          inv.set_length(len);
          v1::InvalidateCacheResponse ir;
          (void)v1::BlockMeta::NewStub(*channel_)->InvalidateCache(&ictx, inv,
                                                                   &ir);
        }
        v1::GetExtentsResponse r;
        grpc::Status s = GetExtents(req, &r);
        if (!s.ok()) {
          errors++;
          continue;
        }
        uint64_t pos = off;
        for (const v1::Extent& e : r.extents()) {
          if (e.offset() != pos || e.length() == 0) wrong++;
          // Every byte of the extent has the flags it claims.
          for (const Extent& t2 : truth) {
            if (t2.end() <= e.offset() || t2.offset >= e.offset() + e.length())
              continue;
            if (t2.flags != e.nbd_flags()) wrong++;
          }
          pos = e.offset() + e.length();
        }
        if (r.extents_size() == 0 || pos > off + len ||
            (req.one_extent() && r.extents_size() != 1)) {
          wrong++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(errors.load(), 0);
}

TEST_F(GrpcServiceTest, CsiAllocatedAndDelta) {
  auto csi = csi::v1::SnapshotMetadata::NewStub(*channel_);
  absl::StatusOr<ExtentList> alloc = NbdinfoMap(qcow_->uri());
  ASSERT_TRUE(alloc.ok());
  std::vector<std::pair<int64_t, int64_t>> want;
  for (const Extent& e : MergeAdjacent(*alloc)) {
    if (e.flags & kStateZero) continue;
    if (!want.empty() && want.back().first + want.back().second ==
                             static_cast<int64_t>(e.offset)) {
      want.back().second += e.length;
    } else {
      want.push_back({e.offset, e.length});
    }
  }
  {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataAllocatedRequest req;
    req.set_snapshot_id("qcow");
    req.set_max_results(1);
    auto reader = csi->GetMetadataAllocated(&ctx, req);
    csi::v1::GetMetadataAllocatedResponse msg;
    std::vector<std::pair<int64_t, int64_t>> got;
    while (reader->Read(&msg)) {
      EXPECT_LE(msg.block_metadata_size(), 1);
      EXPECT_EQ(msg.volume_capacity_bytes(), 32 * kMiB);
      EXPECT_EQ(msg.block_metadata_type(), csi::v1::VARIABLE_LENGTH);
      for (const auto& b : msg.block_metadata()) {
        got.push_back({b.byte_offset(), b.size_bytes()});
      }
    }
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(got, want);
  }
  {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataDeltaRequest req;
    req.set_base_snapshot_id("b1");
    req.set_target_snapshot_id("qcow");
    req.set_starting_offset(5 * kMiB);
    auto reader = csi->GetMetadataDelta(&ctx, req);
    csi::v1::GetMetadataDeltaResponse msg;
    std::vector<std::pair<int64_t, int64_t>> got;
    while (reader->Read(&msg)) {
      for (const auto& b : msg.block_metadata()) {
        got.push_back({b.byte_offset(), b.size_bytes()});
      }
    }
    ASSERT_TRUE(reader->Finish().ok());
    ASSERT_FALSE(got.empty());
    EXPECT_GE(got.front().first, 5 * static_cast<int64_t>(kMiB));
    EXPECT_LE(got.front().first, 20 * static_cast<int64_t>(kMiB));
    EXPECT_GE(got.front().first + got.front().second,
              21 * static_cast<int64_t>(kMiB));
  }
  auto delta_code = [&](const std::string& base, const std::string& target,
                        int64_t start) {
    grpc::ClientContext ctx;
    csi::v1::GetMetadataDeltaRequest req;
    req.set_base_snapshot_id(base);
    req.set_target_snapshot_id(target);
    req.set_starting_offset(start);
    auto reader = csi->GetMetadataDelta(&ctx, req);
    csi::v1::GetMetadataDeltaResponse msg;
    while (reader->Read(&msg)) {
    }
    return reader->Finish();
  };
  grpc::Status s = delta_code("nobitmap", "qcow", 0);
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_NE(s.error_message().find("full backup"), std::string::npos);
  EXPECT_THAT(delta_code("b1", "nosuch", 0),
              StatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(delta_code("b1", "qcow", 32 * kMiB),
              StatusIs(grpc::StatusCode::OUT_OF_RANGE));
  EXPECT_THAT(delta_code("b1", "qcow", -1),
              StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_THAT(delta_code("", "qcow", 0),
              StatusIs(grpc::StatusCode::INVALID_ARGUMENT));
}

TEST_F(GrpcServiceTest, HealthAndMetrics) {
  auto health = grpc::health::v1::Health::NewStub(*channel_);
  for (const std::string& service :
       {std::string(""), std::string("blockmeta.v1.BlockMeta"),
        ExportHealthServiceName("data")}) {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status s;
    // The upstreams are connected (SetUpTestSuite): SERVING soon.
    EXPECT_TRUE(Eventually([&] {
      grpc::ClientContext c2;
      s = health->Check(&c2, req, &resp);
      return s.ok() &&
             resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    }));
    EXPECT_TRUE(s.ok()) << service;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING)
        << service;
  }
  v1::GetExtentsResponse r;
  ASSERT_TRUE(GetExtents(Req("data", 0, kMiB), &r).ok());
  std::string metrics = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NE(metrics.find("grpc_server_handled_total{grpc_code=\"OK\","
                         "grpc_method=\"GetExtents\""),
            std::string::npos)
      << metrics.substr(0, 2000);
  EXPECT_NE(metrics.find("grpc_server_handling_seconds_bucket"),
            std::string::npos);
  EXPECT_NE(
      metrics.find("blockmeta_cache_hits_total{context=\"base:allocation\","
                   "export=\"data\"}"),
      std::string::npos);
  EXPECT_NE(metrics.find("blockmeta_upstream_calls_total"), std::string::npos);
  // The engine's counters, per export and per connection.
  EXPECT_NE(metrics.find("blockmeta_upstream_commands_total{export=\"data\"}"),
            std::string::npos);
  EXPECT_NE(metrics.find("blockmeta_upstream_commands_in_flight{export="
                         "\"data\"} 0"),
            std::string::npos);
  EXPECT_NE(metrics.find("blockmeta_upstream_connection_max_in_flight{conn="
                         "\"0\",export=\"data\"}"),
            std::string::npos);
}

TEST_F(GrpcServiceTest, StatsAndInvalidate) {
  v1::GetExtentsResponse r;
  ASSERT_TRUE(GetExtents(Req("data", 0, 64 * kMiB), &r).ok());
  grpc::ClientContext ctx;
  v1::InvalidateCacheRequest inv;
  inv.set_export_name("data");
  v1::InvalidateCacheResponse ir;
  ASSERT_TRUE(Stub()->InvalidateCache(&ctx, inv, &ir).ok());
  EXPECT_GT(ir.bytes_dropped(), 0u);
  ASSERT_TRUE(GetExtents(Req("data", 0, 64 * kMiB), &r).ok());
  EXPECT_EQ(r.cache_outcome(), v1::CACHE_OUTCOME_MISS);
  grpc::ClientContext sctx;
  v1::GetStatsRequest sreq;
  sreq.set_export_name("data");
  v1::GetStatsResponse stats;
  ASSERT_TRUE(Stub()->GetStats(&sctx, sreq, &stats).ok());
  ASSERT_EQ(stats.exports_size(), 1);
  EXPECT_GT(stats.exports(0).upstream_calls(), 0u);
  EXPECT_GT(stats.total().invalidations(), 0u);
}

// Kills its upstream, so it has its own upstream and server: no other test
// depends on running before or after it.
TEST(GrpcServiceStandaloneTest, UpstreamDownIsUnavailableThenRecovers) {
  auto up = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "data",
                               "data=@1048576 1 2 3", "size=4M"});
  ASSERT_TRUE(up.ok()) << up.status();
  v1::ServerConfig config;
  config.set_grpc_listen("127.0.0.1:0");
  v1::ExportConfig* e = config.add_exports();
  e->set_name("data");
  e->set_nbd_uri((*up)->uri());
  auto server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = LoopbackChannel(**server);
  ASSERT_TRUE(WaitExportsReady(channel, 1).ok());
  auto stub = v1::BlockMeta::NewStub(channel);
  v1::GetExtentsRequest req;
  req.set_export_name("data");
  req.set_length(kMiB);
  req.set_cache_mode(v1::CACHE_MODE_BYPASS);
  auto get = [&](absl::Duration deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    v1::GetExtentsResponse r;
    return stub->GetExtents(&ctx, req, &r);
  };

  (*up)->Kill();
  absl::Time start = absl::Now();
  grpc::Status s = get(absl::Seconds(10));
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::UNAVAILABLE)) << s.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ASSERT_TRUE((*up)->Restart().ok());
  EXPECT_TRUE(Eventually([&] { return get(absl::Seconds(5)).ok(); }))
      << get(absl::Seconds(5)).error_message();
}

}  // namespace
}  // namespace blockmeta
