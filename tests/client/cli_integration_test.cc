// tests/client/cli_integration_test.cc — every `blockmeta` subcommand
// against a real blockmetad fronting real qemu-nbd / nbdkit upstreams: the
// happy path of each, the server's error codes as exit codes, the cache
// being used (stats) and dropped (invalidate), an upstream that dies, and a
// short load-generator run.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

class CliIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = dir_.File("disk.qcow2");
    ASSERT_TRUE(MakeImage(image_, "qcow2", 64 << 20,
                          {"write -P 1 0 1M", "write -z 4M 1M"})
                    .ok());
    ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", image_, "b1"}).ok());
    ASSERT_TRUE(QemuIo(image_, "qcow2", {"write -P 2 8M 2M"}).ok());
    auto q = NbdProcess::Start({"qemu-nbd", "-t", "-r", "--shared=16", "-k",
                                "{sock}", "-f", "qcow2", "-B", "b1", image_});
    ASSERT_TRUE(q.ok()) << q.status();
    qemu_ = *std::move(q);
    auto k =
        NbdProcess::Start({"nbdkit", "-f", "-U", "{sock}", "memory", "16M"});
    ASSERT_TRUE(k.ok()) << k.status();
    nbdkit_ = *std::move(k);
    auto s =
        Blockmetad::Start({{"disk", qemu_->uri()}, {"mem", nbdkit_->uri()}});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    // Start each test with every upstream connected.
    ASSERT_EQ(server_->AwaitHealth("blockmeta.v1.BlockMeta", "SERVING\n").out,
              "SERVING\n")
        << server_->Log();
  }

  RunResult Cli(std::vector<std::string> args) {
    RunResult r = server_->Cli(std::move(args));
    return r;
  }

  TempDir dir_;
  std::string image_;
  std::unique_ptr<NbdProcess> qemu_, nbdkit_;
  std::unique_ptr<Blockmetad> server_;
};

TEST_F(CliIntegrationTest, ListAndInfo) {
  RunResult r = Cli({"list"});
  ASSERT_EQ(r.exit_code, 0) << r.err << server_->Log();
  EXPECT_THAT(r.out, StartsWith("NAME  STATE"));
  EXPECT_THAT(r.out, HasSubstr("disk  READY"));
  EXPECT_THAT(r.out, HasSubstr("64.0 MiB"));
  EXPECT_THAT(r.out, HasSubstr("mem   READY"));
  r = Cli({"list", "--output=json"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("\"name\": \"disk\""));

  r = Cli({"info", "disk"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("size:        64.0 MiB (67108864 bytes)"));
  EXPECT_THAT(r.out, HasSubstr("qemu:dirty-bitmap:b1"));
  EXPECT_THAT(r.out, HasSubstr("read-only:   yes"));
  r = Cli({"info", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("blockmeta info: GetExportInfo: NOT_FOUND: "));
}

TEST_F(CliIntegrationTest, MapAndChanged) {
  RunResult r = Cli({"map", "disk"});
  ASSERT_EQ(r.exit_code, 0) << r.err << server_->Log();
  EXPECT_THAT(r.out, HasSubstr("export disk, context base:allocation, "
                               "range 0-67108864 (64.0 MiB)"));
  EXPECT_THAT(r.out, HasSubstr("1.0 MiB  data\n"));
  EXPECT_EQ(r.err, "");

  r = Cli({"map", "disk", "--offset=8M", "--length=2M", "--output=csv"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "offset,length,type,description\n8388608,2097152,0,data\n");

  r = Cli({"map", "disk", "--output=json", "--length=1M"});
  EXPECT_THAT(r.out, HasSubstr("\"extents\": [\n{\"offset\": 0, \"length\": "
                               "1048576, \"type\": 0, \"description\": "
                               "\"data\""));

  r = Cli({"changed", "disk", "--bitmap=b1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The ZERO column comes from base:allocation in the same query.
  EXPECT_THAT(r.out, HasSubstr("LENGTH  TYPE   ZERO\n"));
  EXPECT_THAT(r.out,
              HasSubstr("\n 8388608  10485760     2.0 MiB  dirty  data\n"));
  EXPECT_THAT(r.out, HasSubstr("1 dirty range, 2.0 MiB of 64.0 MiB (3.1%) "
                               "changed, 0 B of it reads as zeroes\n"));

  r = Cli({"map", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("MapExtents: NOT_FOUND"));
  r = Cli({"map", "disk", "--offset=64M"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("MapExtents: OUT_OF_RANGE"));
  r = Cli({"changed", "disk", "--bitmap=nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("MapExtents: FAILED_PRECONDITION"));
}

// Sum of a column of `stats` for the row starting with `prefix`.
uint64_t StatsField(const std::string& stats, const std::string& prefix,
                    int column) {
  for (absl::string_view line : absl::StrSplit(stats, '\n')) {
    if (!absl::StartsWith(line, prefix)) continue;
    std::vector<absl::string_view> cols =
        absl::StrSplit(line, ' ', absl::SkipEmpty());
    uint64_t v = 0;
    if (static_cast<int>(cols.size()) > column &&
        absl::SimpleAtoi(cols[column], &v)) {
      return v;
    }
  }
  return UINT64_MAX;
}

TEST_F(CliIntegrationTest, StatsShowCacheUseAndInvalidateDropsIt) {
  ASSERT_EQ(Cli({"map", "mem", "--output=nbdinfo"}).exit_code, 0);
  ASSERT_EQ(Cli({"map", "mem", "--output=nbdinfo"}).exit_code, 0);
  RunResult r = Cli({"stats"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("mem "));
  EXPECT_THAT(r.out, HasSubstr("base:allocation"));
  // (total) row: HITS is the first number (column 1).
  EXPECT_GE(StatsField(r.out, "(total)", 1), 1u) << r.out;
  r = Cli({"stats", "mem", "--output=json"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("\"export_name\": \"mem\""));

  r = Cli({"invalidate", "mem"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, StartsWith("dropped "));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("dropped 0 ")));
  r = Cli({"invalidate"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = Cli({"invalidate", "disk", "--context=base:allocation", "--offset=1M",
           "--length=1M", "--output=json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("\"bytes_dropped\""));
  r = Cli({"invalidate", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("InvalidateCache: NOT_FOUND"));
  r = Cli({"stats", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("GetStats: NOT_FOUND"));
}

TEST_F(CliIntegrationTest, Health) {
  // The whole server serves as soon as it listens.
  RunResult r = Cli({"health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  // The BlockMeta service serves once every upstream is connected.
  r = server_->AwaitHealth("blockmeta.v1.BlockMeta", "SERVING\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");
  r = Cli({"health", "blockmeta.v1.BlockMeta/mem"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = Cli({"health", "no.such.Service"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("health check: NOT_FOUND"));
  // An upstream goes away: its export and the service stop serving (exit 5),
  // the server as a whole still serves.
  nbdkit_->Kill();
  r = server_->AwaitHealth("blockmeta.v1.BlockMeta/mem", "NOT_SERVING\n");
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  r = Cli({"health", "blockmeta.v1.BlockMeta"});
  EXPECT_EQ(r.exit_code, 5);
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  r = Cli({"health", "blockmeta.v1.BlockMeta/disk"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(Cli({"health"}).exit_code, 0);
}

TEST_F(CliIntegrationTest, UpstreamDownIsUnavailable) {
  ASSERT_EQ(Cli({"map", "mem", "--output=nbdinfo"}).exit_code, 0);
  nbdkit_->Kill();
  RunResult r = Cli({"map", "mem", "--cache=bypass", "--timeout=5s"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_THAT(r.err, HasSubstr("MapExtents: UNAVAILABLE"));
  // The server answered: the CLI says so, and does not ask whether a server
  // runs there (issue 21 item 11).
  EXPECT_THAT(r.err, HasSubstr("is running and answered UNAVAILABLE"));
  EXPECT_THAT(r.err, Not(HasSubstr("is a blockmeta server running")));
  EXPECT_LT(r.elapsed, absl::Seconds(30));
  // The other export still answers.
  EXPECT_EQ(Cli({"map", "disk", "--output=nbdinfo"}).exit_code, 0);
}

TEST_F(CliIntegrationTest, BenchShortRun) {
  RunResult r = Cli({"bench", "--rpc=compare", "--export=disk",
                     "--duration=500ms", "--warmup=200ms", "--rounds=1",
                     "--concurrency=8", "--pattern=random", "--length=64k"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err << server_->Log();
  EXPECT_THAT(r.out, HasSubstr("Health.Check: concurrency 8"));
  EXPECT_THAT(r.out, HasSubstr("GetExtents: concurrency 8"));
  EXPECT_THAT(r.out, HasSubstr("errors 0"));
  EXPECT_THAT(r.out, HasSubstr("cache outcomes: HIT"));
  EXPECT_THAT(r.out, HasSubstr("GetExtents/health = "));
}

}  // namespace
}  // namespace blockmeta::testing
