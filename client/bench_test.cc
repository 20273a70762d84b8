// client/bench_test.cc — the load generator against the fake server: calls
// are made and counted, percentiles are ordered, errors are counted by code;
// a bench plan probes, warms, alternates compare rounds and reports the
// median; the JSON has the documented shape.
#include "client/bench.h"

#include <sstream>

#include "client/blockmeta_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/fake_blockmeta_server.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::client {
namespace {

using ::blockmeta::testing::StatusIs;

using testing::FakeServer;
using ::testing::HasSubstr;
using ::testing::StartsWith;

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
  EXPECT_THAT(RunBench(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Quick("127.0.0.1:1");
  o.threads = 8;
  EXPECT_THAT(RunBench(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Quick("127.0.0.1:1");
  o.export_name = "";
  EXPECT_THAT(RunBench(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Quick("127.0.0.1:1");
  o.pattern = BenchPattern::kRandom;
  EXPECT_THAT(RunBench(o), StatusIs(absl::StatusCode::kUnavailable));
}

TEST(Bench, Median) {
  EXPECT_EQ(Median({}), 0);
  EXPECT_EQ(Median({2.0}), 2.0);
  EXPECT_EQ(Median({3.0, 1.0, 2.0}), 2.0);
  EXPECT_EQ(Median({4.0, 1.0, 3.0, 2.0}), 2.5);
}

std::unique_ptr<BlockMetaClient> Connect(const std::string& target) {
  ClientOptions o;
  o.target = target;
  auto c = BlockMetaClient::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

TEST(BenchPlan, CompareAlternatesRoundsAndReportsTheMedian) {
  FakeServer server;
  auto client = Connect(server.address());
  ASSERT_NE(client, nullptr);
  BenchPlan plan;
  plan.load = Quick(server.address());
  plan.load.warmup = absl::ZeroDuration();
  plan.load.duration = absl::Milliseconds(100);
  plan.mode = BenchMode::kCompare;
  plan.rounds = 2;
  std::vector<std::string> seen;
  std::ostringstream log;
  std::string step;
  auto r = RunBenchPlan(
      plan, client.get(),
      [&](const BenchResult& run) { seen.push_back(run.rpc); }, &log, &step);
  ASSERT_TRUE(r.ok()) << step << ": " << r.status();
  EXPECT_EQ(seen, (std::vector<std::string>{"Health.Check", "GetExtents",
                                            "Health.Check", "GetExtents"}));
  ASSERT_EQ(r->runs.size(), 4u);
  EXPECT_TRUE(r->all_ok);
  EXPECT_THAT(log.str(), HasSubstr("warmed the cache: "));
  ASSERT_EQ(r->round_ratios.size(), 2u);
  EXPECT_DOUBLE_EQ(r->round_ratios[0], r->runs[1].qps / r->runs[0].qps);
  EXPECT_DOUBLE_EQ(r->median_round_ratio, Median(r->round_ratios));
  EXPECT_DOUBLE_EQ(r->baseline_qps, (r->runs[0].qps + r->runs[2].qps) / 2);
  EXPECT_DOUBLE_EQ(r->ratio, (r->runs[1].qps + r->runs[3].qps) /
                                 (r->runs[0].qps + r->runs[2].qps));
  EXPECT_THAT(FormatBenchSummary(*r), StartsWith("compare: 2 rounds; "));
  std::string json = BenchReportJson(*r);
  EXPECT_THAT(json, StartsWith("{\"runs\": [{\"rpc\": \"Health.Check\""));
  EXPECT_THAT(json, HasSubstr("\"baseline_qps\": "));
  EXPECT_THAT(json, HasSubstr("\"median_round_ratio\": "));
  EXPECT_EQ(json.back(), '\n');
}

TEST(BenchPlan, SingleRunJsonIsTheRunItself) {
  FakeServer server;
  auto client = Connect(server.address());
  ASSERT_NE(client, nullptr);
  BenchPlan plan;
  plan.load = Quick(server.address());
  plan.load.warmup = absl::ZeroDuration();
  plan.load.duration = absl::Milliseconds(100);
  plan.mode = BenchMode::kHealth;
  std::ostringstream log;
  std::string step;
  auto r = RunBenchPlan(
      plan, client.get(), [](const BenchResult&) {}, &log, &step);
  ASSERT_TRUE(r.ok()) << step << ": " << r.status();
  ASSERT_EQ(r->runs.size(), 1u);
  EXPECT_EQ(log.str(), "");  // kHealth does not warm the cache.
  EXPECT_EQ(FormatBenchSummary(*r), "");
  EXPECT_EQ(BenchReportJson(*r), BenchResultJson(r->runs[0]) + "\n");
  EXPECT_THAT(BenchReportJson(*r),
              StartsWith("{\"rpc\": \"Health.Check\", \"concurrency\": 4, "));
}

TEST(BenchPlan, FailedProbeNamesItsStep) {
  FakeServer server;
  auto client = Connect(server.address());
  ASSERT_NE(client, nullptr);
  BenchPlan plan;
  plan.load = Quick(server.address());
  plan.load.export_name = "nope";
  std::ostringstream log;
  bool ran = false;
  auto on_run = [&](const BenchResult&) { ran = true; };
  std::string step;
  auto r = RunBenchPlan(plan, client.get(), on_run, &log, &step);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(step, "warming the cache (MapExtents)");
  plan.warm = false;
  r = RunBenchPlan(plan, client.get(), on_run, &log, &step);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(step, "GetExportInfo");
  EXPECT_FALSE(ran);

  auto unreachable = Connect("127.0.0.1:1");
  ASSERT_NE(unreachable, nullptr);
  plan.mode = BenchMode::kHealth;
  r = RunBenchPlan(plan, unreachable.get(), on_run, &log, &step);
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(step, "health check");
  EXPECT_FALSE(ran);
}

}  // namespace
}  // namespace blockmeta::client
