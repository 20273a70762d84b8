// tests/nbd/memory_pressure_test.cc — a scan makes progress under memory
// pressure. A cold `qemu-img map` through the shim of a 256 MiB nbdkit
// sparse-random upstream (percent=50 runlength=4096: one answer is about
// 65k extents, ~2.3 MB of intervals) with cache.memory_limit_bytes = 1 MiB
// completes, equals the direct map, and takes at most 2x (plus a second of
// slack for a loaded machine) what the same map takes with the default
// bound, measured in the same test. Before fills kept the part nearest the
// scan, each fill was evicted whole and the map made 600+ upstream calls
// covering 0.9 % of the disk in 60 s.
#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/blockmeta_server.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuImgMap;

struct MapRun {
  absl::Duration took;
  ExtentList map;
};

// A fresh (cold) server with the given bound; maps through its shim.
MapRun MapThroughShim(const std::string& upstream_uri, uint64_t memory_limit,
                      const std::string& tag) {
  const std::string sock =
      absl::StrCat("/tmp/bm-mp-", getpid(), "-", tag, ".sock");
  v1::ServerConfig c;
  c.set_grpc_listen("127.0.0.1:0");
  c.set_nbd_unix_socket(sock);
  if (memory_limit != 0)
    c.mutable_cache()->set_memory_limit_bytes(memory_limit);
  v1::ExportConfig* e = c.add_exports();
  e->set_name("disk");
  e->set_nbd_uri(upstream_uri);
  auto server = BlockMetaServer::Create(c);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return {};
  EXPECT_TRUE((*server)->Start().ok());
  const std::string uri = "nbd+unix:///disk?socket=" + sock;
  // Wait until the shim serves (the upstream connects in the background).
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (!testing::RunCommand({"qemu-img", "info", "-f", "raw", uri}).ok() &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  MapRun r;
  const absl::Time t0 = absl::Now();
  absl::StatusOr<ExtentList> m = QemuImgMap(uri, "raw");
  r.took = absl::Now() - t0;
  EXPECT_TRUE(m.ok()) << m.status();
  if (m.ok()) r.map = *std::move(m);
  (*server)->Shutdown(absl::Seconds(1));
  ::unlink(sock.c_str());
  return r;
}

TEST(MemoryPressureTest, ScanCompletesWithAOneMebibyteBound) {
  auto upstream =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "sparse-random",
                         "256M", "seed=7", "percent=50", "runlength=4096"});
  ASSERT_TRUE(upstream.ok()) << upstream.status();
  absl::StatusOr<ExtentList> direct = QemuImgMap((*upstream)->uri(), "raw");
  ASSERT_TRUE(direct.ok()) << direct.status();
  ASSERT_GT(direct->size(), 20000u) << "the answer must exceed the bound";

  const MapRun roomy = MapThroughShim((*upstream)->uri(), 0, "default");
  ASSERT_EQ(roomy.map, *direct);
  const MapRun tight = MapThroughShim((*upstream)->uri(), 1 << 20, "1mib");
  ASSERT_EQ(tight.map, *direct);
  EXPECT_LE(tight.took, 2 * roomy.took + absl::Seconds(1))
      << "1 MiB bound: " << tight.took << ", default bound: " << roomy.took;
  ::testing::Test::RecordProperty("default_bound_ms",
                                  absl::ToInt64Milliseconds(roomy.took));
  ::testing::Test::RecordProperty("one_mib_bound_ms",
                                  absl::ToInt64Milliseconds(tight.took));
}

}  // namespace
}  // namespace blockmeta
