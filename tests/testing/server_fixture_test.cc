// tests/testing/server_fixture_test.cc — MetricSample() on Prometheus text
// exposition (what the waits of server_fixture.h read), and the fixture
// against a real server: a started server's exports become ready and its
// command counter grows when a call reaches the upstream.
#include "tests/testing/server_fixture.h"

#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace testing {
namespace {

using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;

TEST(MetricSampleTest, FindsExactlyTheNamedSample) {
  const std::string text =
      "# HELP blockmeta_upstream_commands_total NBD commands sent\n"
      "# TYPE blockmeta_upstream_commands_total counter\n"
      "blockmeta_upstream_commands_total{export=\"slow_b\"} 9\n"
      "blockmeta_upstream_commands_total{export=\"slow\"} 3\n"
      "blockmeta_upstream_commands_in_flight{export=\"slow\"} 1 1700000000\n"
      "plain 2.5e3\n";
  EXPECT_EQ(
      MetricSample(text, "blockmeta_upstream_commands_total{export=\"slow\"}"),
      3);
  EXPECT_EQ(MetricSample(
                text, "blockmeta_upstream_commands_in_flight{export=\"slow\"}"),
            1);
  EXPECT_EQ(MetricSample(text, "plain"), 2500);
  EXPECT_FALSE(
      MetricSample(text, "blockmeta_upstream_commands_total{export=\"x\"}")
          .has_value());
  EXPECT_FALSE(MetricSample(text, "blockmeta_upstream").has_value());
  EXPECT_FALSE(MetricSample("", "plain").has_value());
}

TEST(ServerFixtureTest, ReadyExportsAndTheCommandCounter) {
  auto up = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "1M"});
  ASSERT_TRUE(up.ok()) << up.status();
  v1::ServerConfig c;
  c.set_grpc_listen("127.0.0.1:0");
  c.set_metrics_listen("127.0.0.1:0");
  v1::ExportConfig* e = c.add_exports();
  e->set_name("mem");
  e->set_nbd_uri((*up)->uri());
  auto server = StartServer(c);
  ASSERT_TRUE(server.ok()) << server.status();
  auto ch = LoopbackChannel(**server);
  absl::Status ready = WaitExportsReady(ch, 1);
  ASSERT_TRUE(ready.ok()) << ready;
  // Two exports were asked for, one is configured: the wait must fail.
  EXPECT_THAT(WaitExportsReady(ch, 2, absl::Milliseconds(200)),
              StatusIs(absl::StatusCode::kDeadlineExceeded));

  const double before = UpstreamCommandsSent(**server, "mem");
  EXPECT_THAT(
      WaitUpstreamCommandsSent(**server, "mem", before,
                               absl::Milliseconds(200)),
      StatusIs(absl::StatusCode::kDeadlineExceeded));  // nothing was called
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  v1::GetExtentsRequest req;
  req.set_export_name("mem");
  req.set_length(4096);
  req.set_cache_mode(v1::CACHE_MODE_BYPASS);
  v1::GetExtentsResponse r;
  ASSERT_TRUE(v1::BlockMeta::NewStub(ch)->GetExtents(&ctx, req, &r).ok());
  absl::Status sent = WaitUpstreamCommandsSent(**server, "mem", before);
  EXPECT_TRUE(sent.ok()) << sent;
  (*server)->Shutdown(absl::Seconds(1));
}

}  // namespace
}  // namespace testing
}  // namespace blockmeta
