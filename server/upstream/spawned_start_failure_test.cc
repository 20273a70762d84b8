// server/upstream/spawned_start_failure_test.cc — a spawned server that
// cannot start fails at once (issue 21 item 8): WaitReady returns long
// before its deadline, and LastError carries the exit status and the last
// lines of stderr (or why exec failed), for commands and image exports.
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_upstream_test_util.h"

namespace blockmeta {
namespace {

// Far from the 60 s deadline the callers give: a start failure must not
// wait for it.
constexpr absl::Duration kDeadline = absl::Seconds(60);
constexpr absl::Duration kPrompt = absl::Seconds(15);

// Creates the upstream and waits for it; returns LastError, checks speed.
std::string StartFailure(const blockmeta::v1::ExportConfig& config) {
  auto up = CreateUpstream(config);
  EXPECT_TRUE(up.ok()) << up.status();
  if (!up.ok()) return "";
  const absl::Time t0 = absl::Now();
  EXPECT_FALSE((*up)->WaitReady(t0 + kDeadline));
  EXPECT_LT(absl::Now() - t0, kPrompt);
  return (*up)->LastError();
}

TEST(SpawnedStartFailureTest, CommandThatExitsAtOnce) {
  const std::string why = StartFailure(CommandExport(
      {"sh", "-c", "echo starting >&2; echo cannot open disk >&2; exit 3"}));
  EXPECT_TRUE(absl::StrContains(why, "failed to start")) << why;
  EXPECT_TRUE(absl::StrContains(why, "exited with status 3")) << why;
  EXPECT_TRUE(absl::StrContains(why, "starting\ncannot open disk")) << why;
}

TEST(SpawnedStartFailureTest, FalseFailsAtOnce) {
  const std::string why = StartFailure(CommandExport({"/bin/false"}));
  EXPECT_TRUE(absl::StrContains(why, "exited with status 1")) << why;
}

TEST(SpawnedStartFailureTest, ProgramThatCannotRun) {
  const std::string why =
      StartFailure(CommandExport({"/nonexistent/nbd-server"}));
  EXPECT_TRUE(absl::StrContains(
      why, "cannot run /nonexistent/nbd-server: No such file or directory"))
      << why;
}

TEST(SpawnedStartFailureTest, ImageThatQemuNbdCannotOpen) {
  blockmeta::testing::TempDir dir;
  const std::string img = dir.File("a.qcow2");
  ASSERT_TRUE(blockmeta::testing::MakeImage(img, "qcow2", 1 << 20).ok());
  const std::string why =
      StartFailure(ImageExport(img, /*read_only=*/false, {"no-such-bitmap"}));
  EXPECT_TRUE(absl::StrContains(why, "exited with status 1")) << why;
  EXPECT_TRUE(absl::StrContains(why, "no-such-bitmap")) << why;
}

}  // namespace
}  // namespace blockmeta
