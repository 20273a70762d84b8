// tests/nbd/spawned_crash_test.cc — a spawned qemu-nbd survives a crash of
// blockmetad cleanly (issue 21 item 2).
//
// A real blockmetad serves a qcow2 `image` export with a dirty bitmap
// (qemu-nbd spawned by it) and the NBD shim. After a write through the
// shim, blockmetad gets SIGKILL. Its qemu-nbd gets SIGTERM as its
// parent-death signal and closes the bitmap cleanly. A restarted blockmetad
// (same config, started at once: it waits for the old qemu-nbd to let go of
// the image) serves the export READY again, with the bitmap intact: the
// `blockmeta changed` map equals `nbdinfo --map` of the new upstream and
// still holds the writes made before the crash. With SIGKILL as the
// parent-death signal this failed: "Bitmap 'b0' is inconsistent".
//
// And when a bitmap IS inconsistent (its qemu-nbd was killed by hand), the
// export says so: last_error, an error-level log line, and
// blockmeta_upstream_bitmap_inconsistent_total. Last, the CLI's
// `export add --command=/bin/false` fails at once, not at its deadline.
#include <unistd.h>

#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/server_fixture.h"
#include "tests/testing/spawn_dir.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::Blockmetad;
using ::blockmeta::testing::MakeImage;
using ::blockmeta::testing::NbdinfoMap;
using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::QemuIo;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;
const char kBitmap[] = "qemu:dirty-bitmap:b0";
const char kHealth[] = "blockmeta.v1.BlockMeta/disk";

uint32_t FlagsAt(const ExtentList& map, uint64_t byte) {
  for (const Extent& e : map) {
    if (byte >= e.offset && byte < e.end()) return e.flags;
  }
  ADD_FAILURE() << "map does not cover " << byte;
  return ~0u;
}

class SpawnedCrashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    img_ = tmp_.File("disk.qcow2");
    ASSERT_TRUE(
        MakeImage(img_, "qcow2", 64 * kMiB, {"write -P 0x1 0 4M"}).ok());
    auto r =
        RunCommand({"qemu-img", "bitmap", "--add", "-g", "64K", img_, "b0"});
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_TRUE(QemuIo(img_, "qcow2", {"write -P 0x2 8M 1M"}).ok());
    config_ = tmp_.File("config.textproto");
    std::ofstream(config_) << "exports { name: \"disk\" image { path: \""
                           << img_ << "\" bitmaps: \"b0\" } }\n";
    shim_ = absl::StrCat("/tmp/bm-crash-", getpid(), ".sock");
    ports_ = tmp_.File("ports");
  }
  void TearDown() override { ::unlink(shim_.c_str()); }

  absl::StatusOr<std::unique_ptr<Blockmetad>> StartDaemon() {
    return Blockmetad::Start(
        {}, {"--config=" + config_, "--nbd_unix_socket=" + shim_,
             "--metrics_listen=127.0.0.1:0", "--port_file=" + ports_});
  }
  std::string ShimUri() const {
    return absl::StrCat("nbd+unix:///disk?socket=", shim_);
  }
  // The bitmap as the upstream blockmetad spawned reports it.
  ExtentList UpstreamBitmap(const Blockmetad& d) {
    const std::string sock = testing::SpawnedServerSocket(
        const_cast<Blockmetad&>(d).process().pid());
    EXPECT_FALSE(sock.empty());
    auto m = NbdinfoMap(absl::StrCat("nbd+unix:///?socket=", sock), kBitmap);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? *m : ExtentList{};
  }
  // `blockmeta changed disk --bitmap=b0 --output=nbdinfo` (nbdinfo's text).
  std::string ChangedThroughBlockmeta(const Blockmetad& d) {
    testing::RunResult r =
        d.Cli({"changed", "disk", "--bitmap=b0", "--output=nbdinfo"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }
  std::string NbdinfoText(const Blockmetad& d) {
    const std::string sock = testing::SpawnedServerSocket(
        const_cast<Blockmetad&>(d).process().pid());
    auto out = RunCommand({"nbdinfo", "--map=qemu:dirty-bitmap:b0",
                           absl::StrCat("nbd+unix:///?socket=", sock)});
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : "";
  }

  TempDir tmp_;
  std::string img_, config_, shim_, ports_;
};

TEST_F(SpawnedCrashTest, SigkillOfBlockmetadKeepsTheBitmapIntact) {
  auto d = StartDaemon();
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ((*d)->AwaitHealth(kHealth, "SERVING\n", absl::Seconds(30)).out,
            "SERVING\n")
      << (*d)->Log();
  ASSERT_TRUE(QemuIo(ShimUri(), "raw", {"write -P 0x3 20M 4k"}).ok());
  EXPECT_EQ(ChangedThroughBlockmeta(**d), NbdinfoText(**d));

  // The crash, and a restart at once with the same configuration.
  ASSERT_TRUE((*d)->process().Restart().ok()) << (*d)->Log();
  ASSERT_EQ((*d)->AwaitHealth(kHealth, "SERVING\n", absl::Seconds(30)).out,
            "SERVING\n")
      << (*d)->Log();
  testing::RunResult list = (*d)->Cli({"list", "--output=json"});
  EXPECT_EQ(list.exit_code, 0) << list.err;
  EXPECT_TRUE(absl::StrContains(list.out, "READY")) << list.out;
  EXPECT_FALSE(absl::StrContains((*d)->Log(), "inconsistent")) << (*d)->Log();

  // The bitmap survived: it still holds the writes before the crash, and
  // blockmeta's incremental map equals the upstream's.
  const ExtentList dirty = UpstreamBitmap(**d);
  EXPECT_EQ(FlagsAt(dirty, 8 * kMiB), 1u);
  EXPECT_EQ(FlagsAt(dirty, 20 * kMiB), 1u);
  EXPECT_EQ(FlagsAt(dirty, 40 * kMiB), 0u);
  EXPECT_EQ(ChangedThroughBlockmeta(**d), NbdinfoText(**d));
  auto info = RunCommand({"qemu-img", "info", "--force-share", img_});
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(absl::StrContains(*info, "name: b0")) << *info;
}

TEST_F(SpawnedCrashTest, AnInconsistentBitmapIsReportedClearly) {
  {  // A qemu-nbd killed by hand leaves b0 marked in use.
    auto q = NbdProcess::Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2",
                                "--persistent", "-B", "b0", img_});
    ASSERT_TRUE(q.ok()) << q.status();
    ASSERT_TRUE(NbdinfoMap((*q)->uri(), kBitmap).ok());
    (*q)->Kill();
  }
  auto d = StartDaemon();
  ASSERT_TRUE(d.ok()) << d.status();
  // GetExportInfo's last_error.
  testing::RunResult info;
  ASSERT_TRUE(testing::Eventually(
      [&] {
        info = (*d)->Cli({"info", "disk", "--output=json"});
        return absl::StrContains(info.out, "inconsistent");
      },
      absl::Seconds(30)))
      << info.out << info.err;
  EXPECT_TRUE(absl::StrContains(info.out,
                                "\"last_error\": \"export disk: "
                                "spawned server [qemu-nbd"))
      << info.out;
  EXPECT_TRUE(absl::StrContains(info.out, "qemu-img bitmap --remove"))
      << info.out;
  EXPECT_TRUE(absl::StrContains(info.out, "EXPORT_STATE_UNAVAILABLE"))
      << info.out;
  // An error-level log line naming the export.
  const std::string log = (*d)->Log();
  EXPECT_TRUE(
      absl::StrContains(log, " error upstream_bitmap_inconsistent export=disk"))
      << log;
  // The metric.
  std::ifstream ports(ports_);
  std::string line;
  ASSERT_TRUE(std::getline(ports, line));
  int metrics_port = 0;
  ASSERT_TRUE(
      absl::SimpleAtoi(line.substr(line.find("metrics=") + 8), &metrics_port))
      << line;
  const std::optional<double> count = testing::MetricSample(
      testing::HttpGet(metrics_port, "/metrics"),
      "blockmeta_upstream_bitmap_inconsistent_total{export=\"disk\"}");
  ASSERT_TRUE(count.has_value());
  EXPECT_GE(*count, 1);
}

// Issue 21 item 8: `export add --command=/bin/false` took the CLI's whole
// 30 s deadline; now the spawned command's exit ends AddExport's wait at
// once, with its exit status.
TEST_F(SpawnedCrashTest, ACommandThatExitsAtOnceFailsAddExportAtOnce) {
  auto d = Blockmetad::Start({}, {});
  ASSERT_TRUE(d.ok()) << d.status();
  testing::RunResult r =
      (*d)->Cli({"export", "add", "fast", "--command=sh -c exit_3_now;exit 3"});
  EXPECT_NE(r.exit_code, 0) << r.out << r.err;
  EXPECT_LT(r.elapsed, absl::Seconds(15)) << r.err;  // the deadline is 30 s
  EXPECT_TRUE(absl::StrContains(r.err, "failed to start")) << r.err;
  EXPECT_TRUE(absl::StrContains(r.err, "exited with status 1")) << r.err;
}

}  // namespace
}  // namespace blockmeta
