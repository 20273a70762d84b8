// server/upstream/image_probe_test.cc — RunBounded's deadline, output
// bound and exit handling; ParseQemuImgInfo on qemu-img's JSON (and on
// text that only looks like a key); ProbeQcow2Granularity on real qcow2
// images made with qemu-img (cluster_size=2M, a bitmap of granularity 4M).
#include "server/upstream/image_probe.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

std::string TempDir() {
  std::string d = ::testing::TempDir();
  if (!d.empty() && d.back() == '/') d.pop_back();
  return d;
}

TEST(RunBounded, ReturnsStdout) {
  absl::StatusOr<std::string> out =
      RunBounded({"echo", "hello"}, absl::Now() + absl::Seconds(10), 100);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "hello\n");
}

TEST(RunBounded, KillsAChildPastTheDeadline) {
  const absl::Time start = absl::Now();
  absl::StatusOr<std::string> out =
      RunBounded({"sleep", "30"}, start + absl::Milliseconds(200), 100);
  EXPECT_THAT(out, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(RunBounded, KillsAChildThatWritesTooMuch) {
  absl::StatusOr<std::string> out =
      RunBounded({"yes"}, absl::Now() + absl::Seconds(10), 4096);
  EXPECT_THAT(out, StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(RunBounded, FailuresAreErrors) {
  EXPECT_THAT(
      RunBounded({"false"}, absl::Now() + absl::Seconds(10), 100).status(),
      StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(RunBounded({"/nonexistent/qemu-img"},
                         absl::Now() + absl::Seconds(10), 100)
                  .status(),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(RunBounded({}, absl::Now(), 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ParseQemuImgInfo, TakesTheLargestOfEachKey) {
  const char kJson[] = R"({
    "virtual-size": 67108864,
    "filename": "a \"granularity\": 999999999999 b",
    "cluster-size": 2097152,
    "format": "qcow2",
    "format-specific": {"type": "qcow2", "data": {
      "bitmaps": [
        {"flags": ["auto"], "name": "b1", "granularity": 4194304},
        {"flags": ["auto"], "name": "b2", "granularity" : 65536}
      ]}}
  })";
  absl::StatusOr<ImageGranularity> g = ParseQemuImgInfo(kJson);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->cluster_size, 2097152u);
  EXPECT_EQ(g->bitmap_granularity, 4194304u);  // not the filename's text
  EXPECT_EQ(g->Max(), 4194304u);
  EXPECT_THAT(ParseQemuImgInfo(R"({"format": "raw"})"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseQemuImgInfo(""),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // A number too large saturates (coarser is safe), never wraps.
  g = ParseQemuImgInfo(R"({"cluster-size": 99999999999999999999999})");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->cluster_size, UINT64_MAX);
}

// A shell command's success, run with the unit under test's own runner.
int Sh(const std::string& cmd) {
  return RunBounded({"sh", "-c", cmd}, absl::Now() + absl::Seconds(60), 1 << 20)
                 .ok()
             ? 0
             : 1;
}

TEST(ProbeQcow2Granularity, ReadsClusterSizeAndBitmapGranularity) {
  const std::string img = TempDir() + "/probe.qcow2";
  ASSERT_EQ(Sh(absl::StrCat("qemu-img create -q -f qcow2 -o cluster_size=2M ",
                            img, " 64M")),
            0);
  absl::StatusOr<ImageGranularity> g = ProbeQcow2Granularity(img);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->cluster_size, 2u << 20);
  EXPECT_EQ(g->bitmap_granularity, 0u);
  ASSERT_EQ(Sh(absl::StrCat("qemu-img bitmap --add -g 4194304 ", img,
                            " coarse && qemu-img bitmap --add ", img, " fine")),
            0);
  g = ProbeQcow2Granularity(img);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->bitmap_granularity, 4u << 20);
  EXPECT_EQ(g->Max(), 4u << 20);
}

TEST(ProbeQcow2Granularity, FailsOnAMissingOrNonQcow2Image) {
  EXPECT_THAT(ProbeQcow2Granularity(TempDir() + "/missing.qcow2"),
              StatusIs(absl::StatusCode::kUnavailable));
  const std::string raw = TempDir() + "/probe.raw";
  ASSERT_EQ(Sh(absl::StrCat("truncate -s 1M ", raw)), 0);
  EXPECT_THAT(ProbeQcow2Granularity(raw),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(ProbeQcow2Granularity(raw, absl::Seconds(10), "/nonexistent"),
              StatusIs(absl::StatusCode::kUnavailable));
}

}  // namespace
}  // namespace blockmeta
