// server/service/metrics_test.cc — Metrics without a server: the shim's
// counters as scraped, and removed exports' upstream-call samples going
// away (also while other threads record calls, for ASan/TSan).
#include "server/service/metrics.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"

namespace blockmeta {
namespace {

TEST(MetricsTest, ShimCountersAreReadAtEachScrape) {
  ExtentCache cache{ExtentCache::Options()};
  Metrics m(&cache);
  EXPECT_FALSE(absl::StrContains(m.Render(), "blockmeta_nbd_connections"));
  std::atomic<uint64_t> open{3};
  m.SetShimCounters([&open] {
    ShimCounters n;
    n.connections = open.load();
    n.rejected = 7;
    n.evicted_handshakes = 2;
    n.evicted_idle = 1;
    n.evicted_stalled = 6;
    n.buffered_bytes = 4096;
    return n;
  });
  std::string text = m.Render();
  EXPECT_TRUE(absl::StrContains(text, "\nblockmeta_nbd_connections 3\n"))
      << text;
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_nbd_connections_rejected_total 7\n"));
  EXPECT_TRUE(
      absl::StrContains(text, "\nblockmeta_nbd_handshakes_evicted_total 2\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_nbd_idle_sessions_evicted_total 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_nbd_stalled_sessions_evicted_total 6\n"));
  EXPECT_TRUE(absl::StrContains(text, "\nblockmeta_nbd_buffered_bytes 4096\n"));
  open = 5;
  EXPECT_TRUE(absl::StrContains(m.Render(), "\nblockmeta_nbd_connections 5\n"));
}

TEST(MetricsTest, ForgetExportDropsItsUpstreamCallSamples) {
  ExtentCache cache{ExtentCache::Options()};
  Metrics m(&cache);
  m.RecordUpstreamCall("gone", absl::Milliseconds(3), absl::OkStatus());
  m.RecordUpstreamCall("gone", absl::Milliseconds(3),
                       absl::UnavailableError("x"));
  m.RecordUpstreamCall("kept", absl::Milliseconds(3), absl::OkStatus());
  std::string text = m.Render();
  ASSERT_TRUE(absl::StrContains(text, "export=\"gone\"")) << text;
  m.ForgetExport("gone");
  m.ForgetExport("never-seen");  // no samples: nothing to do
  text = m.Render();
  EXPECT_FALSE(absl::StrContains(text, "export=\"gone\"")) << text;
  EXPECT_TRUE(absl::StrContains(
      text, "blockmeta_upstream_calls_total{code=\"OK\",export=\"kept\"} 1"))
      << text;
  // A re-added name starts from zero.
  m.RecordUpstreamCall("gone", absl::Milliseconds(3), absl::OkStatus());
  EXPECT_TRUE(absl::StrContains(
      m.Render(),
      "blockmeta_upstream_calls_total{code=\"OK\",export=\"gone\"} 1"));
}

TEST(MetricsTest, ForgetExportWhileCallsAreRecorded) {
  ExtentCache cache{ExtentCache::Options()};
  Metrics m(&cache);
  std::atomic<bool> stop{false};
  std::vector<std::thread> recorders;
  recorders.reserve(2);
  for (int t = 0; t < 2; ++t) {
    recorders.emplace_back([&m, &stop, t] {
      while (!stop.load()) {
        m.RecordUpstreamCall(
            absl::StrCat("e", t), absl::Microseconds(10),
            t == 0 ? absl::OkStatus() : absl::DeadlineExceededError("late"));
      }
    });
  }
  for (int i = 0; i < 2000; ++i) {
    m.ForgetExport(absl::StrCat("e", i % 2));
    if (i % 100 == 0) (void)m.Render();
  }
  stop = true;
  for (std::thread& t : recorders) t.join();
  m.ForgetExport("e0");
  m.ForgetExport("e1");
  EXPECT_FALSE(absl::StrContains(m.Render(), "export=\"e"));
}

}  // namespace
}  // namespace blockmeta
