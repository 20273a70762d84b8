// client/bench_test.cc — the load generator against the fake server: calls
// are made and counted, percentiles are ordered, errors are counted by code.
#include "client/bench.h"

#include "client/fake_server.h"
#include "gtest/gtest.h"

namespace blockmeta::client {
namespace {

using testing::FakeServer;

BenchOptions Quick(const std::string& target) {
  BenchOptions o;
  o.client.target = target;
  o.export_name = "disk";
  o.concurrency = 4;
  o.threads = 2;
  o.channels = 2;
  o.warmup = absl::Milliseconds(100);
  o.duration = absl::Milliseconds(500);
  return o;
}

TEST(Bench, GetExtentsFixedAndRandom) {
  FakeServer server;
  for (BenchPattern p : {BenchPattern::kFixed, BenchPattern::kRandom}) {
    BenchOptions o = Quick(server.address());
    o.pattern = p;
    o.length = 256 << 10;
    auto r = RunBench(o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->rpc, "GetExtents");
    EXPECT_GT(r->calls, 10);
    EXPECT_EQ(r->ok, r->calls);
    EXPECT_TRUE(r->errors.empty());
    EXPECT_EQ(r->cache_outcomes.at("HIT"), r->calls);
    EXPECT_GT(r->qps, 0);
    EXPECT_LE(r->p50, r->p99);
    EXPECT_LE(r->p99, r->p999);
    EXPECT_LE(r->p999, r->max);
    EXPECT_NE(FormatBenchResult(*r).find("QPS"), std::string::npos);
    EXPECT_NE(BenchResultJson(*r).find("\"p999\""), std::string::npos);
  }
}

TEST(Bench, HealthAndErrorsByCode) {
  FakeServer server;
  BenchOptions o = Quick(server.address());
  o.rpc = BenchRpc::kHealth;
  auto h = RunBench(o);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->rpc, "Health.Check");
  EXPECT_GT(h->ok, 10);

  o.rpc = BenchRpc::kExtents;
  o.export_name = "nope";
  auto r = RunBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->ok, 0);
  EXPECT_EQ(r->errors.at("NOT_FOUND"), r->calls);
  EXPECT_NE(FormatBenchResult(*r).find("NOT_FOUND"), std::string::npos);
}

TEST(Bench, RejectsBadOptions) {
  BenchOptions o = Quick("127.0.0.1:1");
  o.concurrency = 0;
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Quick("127.0.0.1:1");
  o.threads = 8;
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Quick("127.0.0.1:1");
  o.export_name = "";
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Quick("127.0.0.1:1");
  o.pattern = BenchPattern::kRandom;
  EXPECT_EQ(RunBench(o).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace blockmeta::client
