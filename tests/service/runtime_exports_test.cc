// tests/service/runtime_exports_test.cc — exports added and removed while
// blockmetad runs, end to end: a real BlockMetaServer with its gRPC Unix
// socket (Admin), TCP (BlockMeta; Admin refused there) and the NBD shim,
// in front of real nbdkit upstreams; real libnbd clients for the shim.
//
// Covered: add (READY on return, idempotent, ALREADY_EXISTS), remove
// (NOT_FOUND at once, GetStats forgets it, the cache keys go), re-add (a
// new generation with zero counters and an empty cache), a stream in
// flight ending with NOT_FOUND "was removed", a shim session closed by the
// removal, reload of good and bad export sets, and PERMISSION_DENIED for
// Admin over TCP.
#include <libnbd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/admin.grpc.pb.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::TempDir;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

class RuntimeExportsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // 1 MiB of data every 2 MiB: several extents.
    auto up = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "data",
                                 "data=1 @2097152 1 @4194304 1", "size=8M"});
    ASSERT_TRUE(up.ok()) << up.status();
    upstream_ = *std::move(up);
    // 500 data bytes 64 KiB apart: 1000 extents; each block-status reply
    // takes 300 ms.
    auto slow = NbdProcess::Start(
        {"nbdkit", "-U", "{sock}", "-f", "--filter=delay", "data",
         "data=( 1 @+65535 ) * 500", "size=32M", "delay-extents=300ms"});
    ASSERT_TRUE(slow.ok()) << slow.status();
    slow_ = *std::move(slow);

    v1::ServerConfig c;
    c.set_grpc_listen("127.0.0.1:0");
    c.set_grpc_unix_socket(dir_.File("grpc.sock"));
    c.set_nbd_unix_socket(dir_.File("nbd.sock"));
    c.set_metrics_listen("127.0.0.1:0");
    v1::ExportConfig* f = c.add_exports();
    f->set_name("from-file");
    f->set_nbd_uri(upstream_->uri());
    config_ = c;
    auto created = ::blockmeta::testing::StartServer(c);
    ASSERT_TRUE(created.ok()) << created.status();
    server_ = *std::move(created);
    unix_ = grpc::CreateChannel("unix:" + dir_.File("grpc.sock"),
                                grpc::InsecureChannelCredentials());
    tcp_ = ::blockmeta::testing::LoopbackChannel(*server_);
    admin_ = v1::Admin::NewStub(unix_);
    meta_ = v1::BlockMeta::NewStub(tcp_);
    // Start() returns before the file's export has connected; a call in
    // that window is UNAVAILABLE ("connecting").
    absl::Status ready = ::blockmeta::testing::WaitExportsReady(tcp_, 1);
    ASSERT_TRUE(ready.ok()) << ready;
  }

  v1::ExportConfig Uri(const std::string& name, const std::string& uri) {
    v1::ExportConfig e;
    e.set_name(name);
    e.set_nbd_uri(uri);
    return e;
  }

  grpc::Status Add(const v1::ExportConfig& e, v1::AddExportResponse* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(20))));
    v1::AddExportRequest r;
    *r.mutable_config() = e;
    return admin_->AddExport(&ctx, r, out);
  }

  grpc::Status Remove(const std::string& name) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(30))));
    v1::RemoveExportRequest r;
    r.set_name(name);
    v1::RemoveExportResponse out;
    return admin_->RemoveExport(&ctx, r, &out);
  }

  grpc::Status Extents(const std::string& name,
                       v1::GetExtentsResponse* out = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(20))));
    v1::GetExtentsRequest r;
    r.set_export_name(name);
    r.set_length(8 << 20);
    v1::GetExtentsResponse tmp;
    return meta_->GetExtents(&ctx, r, out ? out : &tmp);
  }

  v1::GetStatsResponse Stats() {
    grpc::ClientContext ctx;
    v1::GetStatsResponse out;
    EXPECT_TRUE(meta_->GetStats(&ctx, {}, &out).ok());
    return out;
  }

  const v1::ExportStats* StatsOf(const v1::GetStatsResponse& s,
                                 const std::string& name) {
    for (const auto& e : s.exports()) {
      if (e.export_name() == name) return &e;
    }
    return nullptr;
  }

  TempDir dir_;
  std::unique_ptr<NbdProcess> upstream_, slow_;
  v1::ServerConfig config_;
  std::unique_ptr<BlockMetaServer> server_;
  std::shared_ptr<grpc::Channel> unix_, tcp_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::unique_ptr<v1::BlockMeta::Stub> meta_;
};

TEST_F(RuntimeExportsTest, AddRemoveReAddWithANewGeneration) {
  v1::AddExportResponse added;
  grpc::Status s = Add(Uri("job", upstream_->uri()), &added);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(added.created());
  EXPECT_EQ(added.export_info().state(), v1::EXPORT_STATE_READY);  // on return
  EXPECT_EQ(added.export_info().origin(), v1::EXPORT_ORIGIN_API);

  // Same config again: OK, not created; another config: ALREADY_EXISTS.
  v1::AddExportResponse again;
  ASSERT_TRUE(Add(Uri("job", upstream_->uri()), &again).ok());
  EXPECT_FALSE(again.created());
  EXPECT_EQ(again.export_info().generation(), added.export_info().generation());
  EXPECT_THAT(Add(Uri("job", slow_->uri()), &again),
              StatusIs(grpc::StatusCode::ALREADY_EXISTS));

  // Served, cached and counted.
  ASSERT_TRUE(Extents("job").ok());
  v1::GetExtentsResponse hit;
  ASSERT_TRUE(Extents("job", &hit).ok());
  EXPECT_EQ(hit.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  const v1::GetStatsResponse before = Stats();
  ASSERT_NE(StatsOf(before, "job"), nullptr);
  EXPECT_EQ(StatsOf(before, "job")->upstream_calls(), 1u);

  ASSERT_TRUE(Remove("job").ok());
  EXPECT_THAT(Extents("job"), StatusIs(grpc::StatusCode::NOT_FOUND));
  EXPECT_EQ(StatsOf(Stats(), "job"), nullptr);
  EXPECT_THAT(Remove("job"), StatusIs(grpc::StatusCode::NOT_FOUND));
  // The cache freed its keys: the total counts only "from-file" now.
  EXPECT_EQ(Stats().total().hits(), 0u);

  // Re-added: a new generation, zero counters, an empty cache (a miss).
  v1::AddExportResponse re;
  ASSERT_TRUE(Add(Uri("job", upstream_->uri()), &re).ok());
  EXPECT_TRUE(re.created());
  EXPECT_GT(re.export_info().generation(), added.export_info().generation());
  ASSERT_NE(StatsOf(Stats(), "job"), nullptr);
  EXPECT_EQ(StatsOf(Stats(), "job")->upstream_calls(), 0u);
  EXPECT_TRUE(StatsOf(Stats(), "job")->contexts().empty());
  v1::GetExtentsResponse first;
  ASSERT_TRUE(Extents("job", &first).ok());
  EXPECT_EQ(first.cache_outcome(), v1::CACHE_OUTCOME_MISS);
  // The file export never noticed.
  EXPECT_TRUE(Extents("from-file").ok());
}

TEST_F(RuntimeExportsTest, AdminOverTcpWithoutAnIdentityIsPermissionDenied) {
  auto tcp_admin = v1::Admin::NewStub(tcp_);
  grpc::ClientContext ctx;
  v1::AddExportRequest r;
  *r.mutable_config() = Uri("sneaky", upstream_->uri());
  v1::AddExportResponse out;
  grpc::Status s = tcp_admin->AddExport(&ctx, r, &out);
  EXPECT_THAT(s, StatusIs(grpc::StatusCode::PERMISSION_DENIED))
      << s.error_message();
  grpc::ClientContext ctx2;
  v1::AdminListExportsResponse list;
  EXPECT_THAT(tcp_admin->ListExports(&ctx2, {}, &list),
              StatusIs(grpc::StatusCode::PERMISSION_DENIED));
  EXPECT_THAT(Extents("sneaky"), StatusIs(grpc::StatusCode::NOT_FOUND));
}

TEST_F(RuntimeExportsTest, StreamInFlightEndsWithExportRemoved) {
  v1::AddExportResponse added;
  ASSERT_TRUE(Add(Uri("slow", slow_->uri()), &added).ok());
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(In(absl::Seconds(60))));
  v1::MapExtentsRequest r;
  r.set_export_name("slow");
  r.set_batch_size(1);
  r.set_cache_mode(v1::CACHE_MODE_BYPASS);  // every batch asks the upstream
  auto reader = meta_->MapExtents(&ctx, r);
  v1::MapExtentsResponse m;
  ASSERT_TRUE(reader->Read(&m));
  const absl::Time t0 = absl::Now();
  ASSERT_TRUE(Remove("slow").ok());
  int more = 0;
  while (reader->Read(&m)) ++more;
  grpc::Status end = reader->Finish();
  EXPECT_THAT(end, StatusIs(grpc::StatusCode::NOT_FOUND))
      << end.error_message();
  EXPECT_TRUE(absl::StrContains(end.error_message(), "was removed"))
      << end.error_message();
  // The stream stopped within a few batches of the removal, not at the
  // end (1000 extents away).
  EXPECT_LT(more, 50);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(20));
}

TEST_F(RuntimeExportsTest, ShimSessionOfARemovedExportIsClosed) {
  v1::AddExportResponse added;
  ASSERT_TRUE(Add(Uri("nbdjob", upstream_->uri()), &added).ok());
  struct nbd_handle* h = nbd_create();
  ASSERT_NE(h, nullptr);
  ASSERT_EQ(nbd_set_export_name(h, "nbdjob"), 0);
  ASSERT_EQ(nbd_connect_unix(h, dir_.File("nbd.sock").c_str()), 0)
      << nbd_get_error();
  char buf[4096];
  ASSERT_EQ(nbd_pread(h, buf, sizeof buf, 0, 0), 0) << nbd_get_error();
  // A second session, to the file export, must survive.
  struct nbd_handle* other = nbd_create();
  ASSERT_EQ(nbd_set_export_name(other, "from-file"), 0);
  ASSERT_EQ(nbd_connect_unix(other, dir_.File("nbd.sock").c_str()), 0);
  // A reply proves `other` has entered its export (the server records it
  // before the GO reply), so the removal below cannot touch it.
  ASSERT_EQ(nbd_pread(other, buf, sizeof buf, 0, 0), 0) << nbd_get_error();

  ASSERT_TRUE(Remove("nbdjob").ok());
  EXPECT_EQ(nbd_pread(h, buf, sizeof buf, 0, 0), -1);  // closed under it
  EXPECT_EQ(nbd_pread(other, buf, sizeof buf, 0, 0), 0) << nbd_get_error();
  nbd_close(h);
  nbd_close(other);
  // New sessions cannot enter it.
  struct nbd_handle* late = nbd_create();
  ASSERT_EQ(nbd_set_export_name(late, "nbdjob"), 0);
  EXPECT_EQ(nbd_connect_unix(late, dir_.File("nbd.sock").c_str()), -1);
  nbd_close(late);
}

// /metrics forgets a removed export's upstream-call samples (a fleet adding
// and removing exports all day must not grow the exposition without bound)
// and reports the shim's connections.
TEST_F(RuntimeExportsTest, RemovedExportLeavesNoMetricSamples) {
  v1::AddExportResponse added;
  ASSERT_TRUE(Add(Uri("metered", upstream_->uri()), &added).ok());
  ASSERT_TRUE(Extents("metered").ok());  // a miss: one upstream call
  const std::string calls =
      "blockmeta_upstream_calls_total{code=\"OK\",export=\"metered\"}";
  const std::string seconds =
      "blockmeta_upstream_call_seconds_count{export=\"metered\"}";
  std::string text =
      ::blockmeta::testing::HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_TRUE(absl::StrContains(text, calls)) << text;
  EXPECT_TRUE(absl::StrContains(text, seconds)) << text;
  EXPECT_TRUE(absl::StrContains(text, "\nblockmeta_nbd_connections "));
  ASSERT_TRUE(Remove("metered").ok());
  text = ::blockmeta::testing::HttpGet(server_->metrics_port(), "/metrics");
  // (The cache's own samples go when its keys are freed, at the drain.)
  EXPECT_FALSE(absl::StrContains(text, calls)) << text;
  EXPECT_FALSE(absl::StrContains(text, seconds)) << text;
  EXPECT_FALSE(absl::StrContains(
      text, "blockmeta_upstream_commands_total{export=\"metered\"}"));
  EXPECT_TRUE(absl::StrContains(
      text, "blockmeta_upstream_commands_total{export=\"from-file\"}"));
}

TEST_F(RuntimeExportsTest, ReloadAppliesGoodSetsAndRejectsBadOnesWhole) {
  v1::AddExportResponse added;
  ASSERT_TRUE(Add(Uri("api-job", slow_->uri()), &added).ok());
  ASSERT_TRUE(Extents("from-file").ok());  // cached now

  v1::ServerConfig next = config_;
  next.mutable_exports(0)->set_description("changed text");
  *next.add_exports() = Uri("second", upstream_->uri());
  ASSERT_TRUE(server_->Reload(next).ok());
  // Changed in place: the cache survived (a hit), nothing reconnected.
  v1::GetExtentsResponse hit;
  ASSERT_TRUE(Extents("from-file", &hit).ok());
  EXPECT_EQ(hit.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  grpc::ClientContext ctx;
  v1::GetExportInfoRequest ir;
  ir.set_export_name("from-file");
  v1::ExportInfo info;
  ASSERT_TRUE(meta_->GetExportInfo(&ctx, ir, &info).ok());
  EXPECT_EQ(info.description(), "changed text");
  EXPECT_NE(Extents("api-job").error_code(),
            grpc::StatusCode::NOT_FOUND);  // the API export is kept

  // A bad set changes nothing.
  v1::ServerConfig bad = next;
  *bad.add_exports() = Uri("broken", "http://nope");
  absl::Status s = server_->Reload(bad);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(absl::StrContains(s.message(), "broken")) << s;
  EXPECT_THAT(Extents("broken"), StatusIs(grpc::StatusCode::NOT_FOUND));

  // Dropping "second" from the file removes it; the API export stays.
  ASSERT_TRUE(server_->Reload(config_).ok());
  EXPECT_THAT(Extents("second"), StatusIs(grpc::StatusCode::NOT_FOUND));
  grpc::ClientContext lctx;
  v1::AdminListExportsResponse list;
  ASSERT_TRUE(admin_->ListExports(&lctx, {}, &list).ok());
  ASSERT_EQ(list.exports_size(), 2);
  EXPECT_EQ(list.exports(0).config().name(), "api-job");
  EXPECT_EQ(list.exports(0).origin(), v1::EXPORT_ORIGIN_API);
  EXPECT_EQ(list.exports(1).config().name(), "from-file");
  EXPECT_EQ(list.exports(1).origin(), v1::EXPORT_ORIGIN_FILE);
}

}  // namespace
}  // namespace blockmeta
