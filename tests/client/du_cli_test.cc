// tests/client/du_cli_test.cc — `blockmeta du` end to end: the real CLI
// against a real blockmetad fronting qemu-nbd (qcow2 with a dirty bitmap,
// clusters written after the bitmap was made) and nbdkit (sparse-random,
// and a delayed memory disk). Its JSON totals equal sums over
// `nbdinfo --map` and `--map=qemu:dirty-bitmap:b1`; its human output names
// each total; usage errors exit 2, a server error 1, an unreachable
// server 3, a deadline 4; and `du` is in the help.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_map.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 64 * kMiB;
const char kBitmap[] = "qemu:dirty-bitmap:b1";

// `"key": N` inside the object of `context` in du's JSON; -1 if absent.
int64_t Field(const std::string& json, const std::string& context,
              const std::string& key) {
  size_t at = json.find(absl::StrCat("{\"context\": \"", context, "\""));
  if (at == std::string::npos) return -1;
  const size_t end = json.find('}', at);
  at = json.find(absl::StrCat("\"", key, "\": "), at);
  if (at == std::string::npos || at > end) return -1;
  at += key.size() + 4;
  int64_t v = -1;
  const size_t stop = json.find_first_of(",}", at);
  if (!absl::SimpleAtoi(json.substr(at, stop - at), &v)) return -1;
  return v;
}

class DuCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = dir_.File("disk.qcow2");
    ASSERT_TRUE(
        MakeImage(image_, "qcow2", kSize,
                  {"write -P 1 0 8M", "write -z 16M 4M", "write -P 3 40M 1M"})
            .ok());
    ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", image_, "b1"}).ok());
    // After the bitmap: data over data, data into a hole, zeroes over data.
    ASSERT_TRUE(
        QemuIo(image_, "qcow2",
               {"write -P 2 1M 1M", "write -P 4 30M 192k", "write -z 40M 512k"})
            .ok());
    auto q = NbdProcess::Start({"qemu-nbd", "-t", "-r", "--shared=16", "-k",
                                "{sock}", "-f", "qcow2", "-B", "b1", image_});
    ASSERT_TRUE(q.ok()) << q.status();
    qemu_ = *std::move(q);
    auto k = NbdProcess::Start({"nbdkit", "-f", "-U", "{sock}", "sparse-random",
                                "size=8589934592", "seed=7", "percent=40",
                                "runlength=1048576"});
    ASSERT_TRUE(k.ok()) << k.status();
    sparse_ = *std::move(k);
    auto slow =
        NbdProcess::Start({"nbdkit", "-f", "-U", "{sock}", "--filter=delay",
                           "memory", "16M", "delay-extents=5000ms"});
    ASSERT_TRUE(slow.ok()) << slow.status();
    slow_ = *std::move(slow);
    auto s = Blockmetad::Start({{"disk", qemu_->uri()},
                                {"sparse", sparse_->uri()},
                                {"slow", slow_->uri()}});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    ASSERT_EQ(server_->AwaitHealth("blockmeta.v1.BlockMeta", "SERVING\n").out,
              "SERVING\n")
        << server_->Log();
  }

  TempDir dir_;
  std::string image_;
  std::unique_ptr<NbdProcess> qemu_, sparse_, slow_;
  std::unique_ptr<Blockmetad> server_;
};

TEST_F(DuCliTest, JsonTotalsEqualSumsOverNbdinfoMap) {
  auto alloc = NbdinfoMap(qemu_->uri());
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  auto dirty = NbdinfoMap(qemu_->uri(), kBitmap);
  ASSERT_TRUE(dirty.ok()) << dirty.status();
  int64_t data = 0, hole = 0, zero = 0, nonzero = 0, d = 0, clean = 0;
  for (const Extent& e : *alloc) {
    ((e.flags & kStateHole) ? hole : data) += e.length;
    ((e.flags & kStateZero) ? zero : nonzero) += e.length;
  }
  for (const Extent& e : *dirty) {
    ((e.flags & kStateDirty) ? d : clean) += e.length;
  }
  // Changed and not zero, per 512-byte sector of both maps.
  auto at = [](const ExtentList& m, uint64_t b) {
    for (const Extent& e : m) {
      if (b >= e.offset && b < e.end()) return e.flags;
    }
    return ~0u;
  };
  int64_t dirty_data = 0, dirty_nonzero = 0;
  for (uint64_t b = 0; b < kSize; b += 512) {
    if (!(at(*dirty, b) & kStateDirty)) continue;
    if (!(at(*alloc, b) & kStateHole)) dirty_data += 512;
    if (!(at(*alloc, b) & kStateZero)) dirty_nonzero += 512;
  }
  ASSERT_GT(dirty_nonzero, 0);
  ASSERT_GT(d, dirty_nonzero);  // some changed blocks now read as zeroes

  RunResult r = server_->Cli(
      {"du", "disk", absl::StrCat("--context=", kBitmap), "--output=json"});
  ASSERT_EQ(r.exit_code, 0) << r.err << server_->Log();
  const std::string& j = r.out;
  EXPECT_THAT(j, HasSubstr("\"export\": \"disk\", \"export_size\": 67108864, "
                           "\"offset\": 0, \"length\": 67108864"));
  EXPECT_EQ(Field(j, "base:allocation", "data"), data) << j;
  EXPECT_EQ(Field(j, "base:allocation", "hole"), hole) << j;
  EXPECT_EQ(Field(j, "base:allocation", "zero"), zero) << j;
  EXPECT_EQ(Field(j, "base:allocation", "nonzero"), nonzero) << j;
  EXPECT_EQ(Field(j, "base:allocation", "extents"),
            static_cast<int64_t>(MergeAdjacent(*alloc).size()))
      << j;
  EXPECT_EQ(Field(j, kBitmap, "dirty"), d) << j;
  EXPECT_EQ(Field(j, kBitmap, "clean"), clean) << j;
  EXPECT_EQ(Field(j, kBitmap, "dirty_data"), dirty_data) << j;
  EXPECT_EQ(Field(j, kBitmap, "dirty_nonzero"), dirty_nonzero) << j;

  // A range, in text: the slice's sums.
  const ExtentList part = Slice(*alloc, 24 * kMiB, 20 * kMiB);
  int64_t part_data = 0;
  for (const Extent& e : part) {
    if (!(e.flags & kStateHole)) part_data += e.length;
  }
  r = server_->Cli(
      {"du", "disk", "--offset=24M", "--length=20M", "--output=text"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("export disk, range 25165824-46137344 "
                               "(20.0 MiB of 64.0 MiB)"));
  EXPECT_THAT(r.out,
              HasSubstr(absl::StrFormat("  data           %16d", part_data)));
  EXPECT_THAT(r.out, HasSubstr("cache HIT"));  // the first du cached it all
}

TEST_F(DuCliTest, SparseRandomEqualsNbdinfoMap) {
  auto alloc = NbdinfoMap(sparse_->uri());
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  int64_t data = 0, zero = 0;
  for (const Extent& e : *alloc) {
    if (!(e.flags & kStateHole)) data += e.length;
    if (e.flags & kStateZero) zero += e.length;
  }
  RunResult r = server_->Cli({"du", "sparse", "--output=json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Field(r.out, "base:allocation", "data"), data) << r.out;
  EXPECT_EQ(Field(r.out, "base:allocation", "zero"), zero) << r.out;
  r = server_->Cli({"du", "sparse"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("a full backup reads these"));
  EXPECT_THAT(r.out, HasSubstr("cache HIT"));
}

TEST_F(DuCliTest, ErrorsAndExitCodes) {
  RunResult r = server_->Cli({"du", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("GetTotals: NOT_FOUND"));
  r = server_->Cli({"du", "disk", "--offset=64M"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("OUT_OF_RANGE"));
  r = server_->Cli({"du", "sparse", "--context=qemu:dirty-bitmap:b1"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("FAILED_PRECONDITION"));
  r = server_->Cli({"du", "disk", "--output=yaml"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--output: invalid value"));
  r = server_->Cli({"du"});
  EXPECT_EQ(r.exit_code, 2);
  r = server_->Cli({"du", "disk", "--length=0"});
  EXPECT_EQ(r.exit_code, 2);
  // The upstream takes 5 s; the client gives up after 500 ms.
  r = server_->Cli({"du", "slow", "--timeout=500ms"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_THAT(r.err, HasSubstr("DEADLINE_EXCEEDED"));
  // No server there.
  r = RunProgram({RunfilePath("client/blockmeta"), "du", "disk",
                  "--server=unix:" + dir_.File("no.sock")});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.err, HasSubstr("UNAVAILABLE"));
}

TEST_F(DuCliTest, Help) {
  RunResult r = server_->Cli({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("du EXPORT"));
  r = server_->Cli({"du", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("Usage: blockmeta du EXPORT [FLAGS]"));
  EXPECT_THAT(r.out, HasSubstr("--context=NAME[,NAME...]"));
  EXPECT_THAT(r.out, HasSubstr("--output=FORMAT"));
}

}  // namespace
}  // namespace blockmeta::testing
