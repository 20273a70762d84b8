// server/service/metrics_test.cc — Metrics without a server: the shim's
// counters as scraped, and removed exports' upstream-call samples going
// away (also while other threads record calls, for ASan/TSan).
#include "server/service/metrics.h"

#include <atomic>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/upstream/export_registry.h"
#include "tests/testing/fake_upstream.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

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
    n.max_connections = 100;
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
  EXPECT_TRUE(absl::StrContains(text, "\nblockmeta_nbd_max_connections 100\n"));
  open = 5;
  EXPECT_TRUE(absl::StrContains(m.Render(), "\nblockmeta_nbd_connections 5\n"));
}

// An upstream behind the store, as StoreUpstream reports it.
class StoredFakeUpstream : public FakeUpstream {
 public:
  StoredFakeUpstream() : FakeUpstream(1 << 20, 4096, false) {}
  UpstreamStats Stats() const override {
    UpstreamStats s;
    s.store_identity = "id:snap";
    s.store_bytes = 4242;
    s.store_verify_failures = 1;
    UpstreamStats::StoreContext& k = s.store_contexts["base:allocation"];
    k.hits = 3;
    k.misses = 2;
    k.writes = 2;
    k.extents_read = 30;
    k.verify_calls = 1;
    return s;
  }
};

TEST(MetricsTest, StoreFiguresAndUpstreamCallsWithoutStoreHits) {
  ExtentCache cache{ExtentCache::Options()};
  blockmeta::v1::ExportConfig c;
  c.set_name("snap");
  c.set_nbd_uri("nbd://h/x");
  std::vector<std::pair<blockmeta::v1::ExportConfig, std::unique_ptr<Upstream>>>
      ups;
  ups.emplace_back(c, std::make_unique<StoredFakeUpstream>());
  std::unique_ptr<ExportRegistry> registry =
      ExportRegistry::FromUpstreams(std::move(ups));
  Metrics m(&cache, registry.get());
  // The cache counted 5 calls through the upstream: 3 the store answered.
  CacheKey key{"snap", "base:allocation"};
  for (int i = 0; i < 5; ++i) cache.RecordUpstreamCall(key, absl::OkStatus());
  m.SetStoreCounters([] {
    StoreCounters n;
    n.bytes = 9000;
    n.max_bytes = 1 << 30;
    n.set_aside = 1;
    return n;
  });
  std::string text = m.Render();
  const std::string l = "{context=\"base:allocation\",export=\"snap\"}";
  // 5 - 3 hits + 1 check: what the upstream saw.
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_cache_upstream_calls_total" + l + " 3\n"))
      << text;
  EXPECT_TRUE(
      absl::StrContains(text, "\nblockmeta_store_hits_total" + l + " 3\n"));
  EXPECT_TRUE(
      absl::StrContains(text, "\nblockmeta_store_misses_total" + l + " 2\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_store_verify_calls_total" + l + " 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_store_export_bytes{export=\"snap\"} 4242\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "\nblockmeta_store_verify_failures_total{export=\"snap\"} 1\n"));
  EXPECT_TRUE(absl::StrContains(text, "\nblockmeta_store_bytes 9000\n"));
  EXPECT_TRUE(absl::StrContains(text, "\nblockmeta_store_set_aside_total 1\n"));
}

TEST(MetricsTest, ExportReadyFollowsTheUpstream) {
  auto up = std::make_unique<FakeUpstream>(1 << 20, 4096, false);
  FakeUpstream* fake = up.get();  // owned by the registry
  std::vector<std::pair<v1::ExportConfig, std::unique_ptr<Upstream>>> ups;
  v1::ExportConfig c;
  c.set_name("disk");
  ups.emplace_back(c, std::move(up));
  std::unique_ptr<ExportRegistry> registry =
      ExportRegistry::FromUpstreams(std::move(ups));
  ExtentCache cache{ExtentCache::Options()};
  Metrics m(&cache, registry.get());
  EXPECT_TRUE(absl::StrContains(
      m.Render(), "\nblockmeta_export_ready{export=\"disk\"} 1\n"))
      << m.Render();
  fake->set_ready(false);
  EXPECT_TRUE(absl::StrContains(
      m.Render(), "\nblockmeta_export_ready{export=\"disk\"} 0\n"));
  ASSERT_TRUE(registry->Remove("disk").ok());
  EXPECT_FALSE(absl::StrContains(m.Render(), "export=\"disk\""));
}

// Read-ahead walks and whole-map prefetch show per export and context.
TEST(MetricsTest, ReadAheadAndPrefetchCountersAreScraped) {
  ExtentCache::Options o;
  o.fetch_window_bytes = 1 << 20;
  ExtentCache cache(o);
  cache.SetExportPrefetch("a", 2);
  Metrics m(&cache);
  // An upstream of 4 MiB of data that answers at once.
  const AsyncFetcher fetch = [](uint64_t off, uint64_t len, FetchDone done) {
    std::move(done)(ExtentList{{off, len, 0}});
  };
  const CacheKey key{"a", "base:allocation"};
  ASSERT_TRUE(
      cache.Get(key, 4 << 20, 0, 4096, 0, fetch, absl::InfiniteFuture()).ok());
  const std::string text = m.Render();
  const std::string labels = "{context=\"base:allocation\",export=\"a\"} ";
  const std::pair<const char*, const char*> kWant[] = {
      {"blockmeta_cache_prefetch_issued_total", "3"},
      {"blockmeta_cache_prefetch_completed_total", "1"},
      {"blockmeta_cache_prefetch_bytes_total", "3145728"},
      {"blockmeta_cache_prefetch_inflight", "0"},
      {"blockmeta_cache_read_ahead_walks_total", "0"},
  };
  for (const auto& [name, value] : kWant) {
    EXPECT_TRUE(
        absl::StrContains(text, absl::StrCat("\n", name, labels, value, "\n")))
        << name << "\n"
        << text;
  }
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
