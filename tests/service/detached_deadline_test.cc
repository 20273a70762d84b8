// tests/service/detached_deadline_test.cc — a caller's deadline never costs
// the shared cache. Against a real nbdkit whose extents answers are delayed
// (--filter=delay), an impatient GetExtents miss gets DEADLINE_EXCEEDED;
// the other cached ranges still hit (the upstream handle was not closed, so
// nothing was dropped), and the late answer is then served from the cache
// with no new upstream call (counted by the cache's per-export counters,
// which count every upstream call).
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::Eventually;
using ::blockmeta::testing::StatusIs;

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::NbdProcess;

constexpr uint64_t kMiB = 1 << 20;
constexpr absl::Duration kDelay = absl::Seconds(1);

TEST(DetachedDeadlineTest, ImpatientMissKeepsTheCacheAndCachesTheLateAnswer) {
  auto upstream =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "--filter=delay",
                         "memory", "64M", "delay-extents=1"});
  ASSERT_TRUE(upstream.ok()) << upstream.status();
  v1::ServerConfig c;
  c.set_grpc_listen("127.0.0.1:0");
  // One 1 MiB window per miss and no read-ahead: each range is its own call.
  c.mutable_cache()->set_fetch_window_bytes(1 * kMiB);
  c.mutable_cache()->set_read_ahead_windows(0);
  v1::ExportConfig* e = c.add_exports();
  e->set_name("slow");
  e->set_nbd_uri((*upstream)->uri());
  auto server = ::blockmeta::testing::StartServer(c);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub =
      v1::BlockMeta::NewStub(::blockmeta::testing::LoopbackChannel(**server));
  auto get = [&](uint64_t offset, absl::Duration timeout,
                 v1::GetExtentsResponse* r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    v1::GetExtentsRequest req;
    req.set_export_name("slow");
    req.set_offset(offset);
    req.set_length(1 * kMiB);
    return stub->GetExtents(&ctx, req, r);
  };
  auto stats = [&] {
    grpc::ClientContext ctx;
    v1::GetStatsRequest req;
    req.set_export_name("slow");
    v1::GetStatsResponse s;
    EXPECT_TRUE(stub->GetStats(&ctx, req, &s).ok());
    return s;
  };

  // Cache [0, 1M) with a patient caller (retrying until connected).
  v1::GetExtentsResponse r;
  grpc::Status st;
  ASSERT_TRUE(
      Eventually([&] { return (st = get(0, absl::Seconds(20), &r)).ok(); },
                 absl::Seconds(30)))
      << st.error_message();
  const uint64_t calls0 = stats().exports(0).upstream_calls();
  const uint64_t reconnects0 = stats().exports(0).reconnects();
  ASSERT_GE(calls0, 1u);

  // An impatient miss: its deadline passes long before the delayed answer.
  const absl::Time t0 = absl::Now();
  st = get(8 * kMiB, absl::Milliseconds(100), &r);
  EXPECT_THAT(st, StatusIs(grpc::StatusCode::DEADLINE_EXCEEDED))
      << st.error_message();
  EXPECT_LT(absl::Now() - t0, kDelay) << "the caller must not wait it out";

  // The rest of the cache still hits, at once: nothing was dropped.
  ASSERT_TRUE(get(0, absl::Seconds(5), &r).ok());
  EXPECT_EQ(r.cache_outcome(), v1::CACHE_OUTCOME_HIT);
  EXPECT_EQ(stats().exports(0).reconnects(), reconnects0);

  // The late answer lands in the cache: the impatient range becomes a hit
  // without another upstream call (callers meanwhile wait for the same
  // call: single-flight).
  ASSERT_TRUE(Eventually(
      [&] {
        st = get(8 * kMiB, absl::Seconds(5), &r);
        return st.ok() && r.cache_outcome() == v1::CACHE_OUTCOME_HIT;
      },
      absl::Seconds(30)))
      << st.error_message();
  ASSERT_EQ(r.extents_size(), 1);
  EXPECT_EQ(r.extents(0).offset(), 8 * kMiB);
  EXPECT_TRUE(r.extents(0).hole());
  const v1::ExportStats s = stats().exports(0);
  EXPECT_EQ(s.upstream_calls(), calls0 + 1);
  EXPECT_EQ(s.reconnects(), reconnects0);
  (*server)->Shutdown(absl::Seconds(1));
}

}  // namespace
}  // namespace blockmeta
