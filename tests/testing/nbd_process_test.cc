// tests/testing/nbd_process_test.cc — the test-support process helpers
// against real nbdkit / qemu-nbd / qemu-img.
#include "tests/testing/nbd_process.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta::testing {
namespace {

using ::blockmeta::testing::StatusIs;

bool Alive(pid_t pid) { return pid > 0 && kill(pid, 0) == 0; }

TEST(RunCommandTest, ReturnsStdout) {
  absl::StatusOr<std::string> out = RunCommand({"echo", "hello"});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "hello\n");
}

TEST(RunCommandTest, NonzeroExitIsErrorWithStderr) {
  absl::StatusOr<std::string> out =
      RunCommand({"sh", "-c", "echo oops >&2; exit 3"});
  ASSERT_THAT(out, StatusIs(absl::StatusCode::kInternal));
  EXPECT_TRUE(absl::StrContains(out.status().message(), "exit status 3"));
  EXPECT_TRUE(absl::StrContains(out.status().message(), "oops"));
}

TEST(RunCommandTest, MissingProgramIsError) {
  absl::StatusOr<std::string> out = RunCommand({"/nonexistent/prog"});
  EXPECT_THAT(out, StatusIs(absl::StatusCode::kInternal));
}

TEST(RunCommandTest, TimeoutKillsTheProcess) {
  absl::Time start = absl::Now();
  absl::StatusOr<std::string> out =
      RunCommand({"sleep", "30"}, absl::Milliseconds(200));
  EXPECT_THAT(out, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(TempDirTest, CreatedAndRemoved) {
  std::string path;
  {
    TempDir dir;
    path = dir.path();
    struct stat st;
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    EXPECT_TRUE(S_ISDIR(st.st_mode));
    ASSERT_TRUE(RunCommand({"touch", dir.File("x")}).ok());
  }
  struct stat st;
  EXPECT_NE(stat(path.c_str(), &st), 0);
}

TEST(NbdProcessTest, NbdkitServesAndDiesWithTheObject) {
  pid_t pid;
  {
    absl::StatusOr<std::unique_ptr<NbdProcess>> p =
        NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "1M"});
    ASSERT_TRUE(p.ok()) << p.status();
    pid = (*p)->pid();
    EXPECT_TRUE(Alive(pid));
    EXPECT_EQ((*p)->uri(), "nbd+unix:///?socket=" + (*p)->socket_path());
    absl::StatusOr<std::string> size =
        RunCommand({"nbdinfo", "--size", (*p)->uri()});
    ASSERT_TRUE(size.ok()) << size.status();
    EXPECT_EQ(*size, "1048576\n");
  }
  EXPECT_FALSE(Alive(pid));  // reaped, so not even a zombie
}

TEST(NbdProcessTest, KillAndRestartOnTheSameSocket) {
  absl::StatusOr<std::unique_ptr<NbdProcess>> p =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "2M"});
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string sock = (*p)->socket_path();
  (*p)->Kill();
  EXPECT_EQ((*p)->pid(), -1);
  EXPECT_FALSE(
      RunCommand({"nbdinfo", "--size", (*p)->uri()}, absl::Seconds(10)).ok());
  ASSERT_TRUE((*p)->Restart().ok());
  EXPECT_EQ((*p)->socket_path(), sock);
  absl::StatusOr<std::string> size =
      RunCommand({"nbdinfo", "--size", (*p)->uri()});
  ASSERT_TRUE(size.ok()) << size.status();
  EXPECT_EQ(*size, "2097152\n");
}

TEST(NbdProcessTest, EarlyExitReportsServerStderr) {
  absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<NbdProcess>> p =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "no-such-plugin"});
  ASSERT_THAT(p, StatusIs(absl::StatusCode::kInternal));
  EXPECT_TRUE(absl::StrContains(p.status().message(), "no-such-plugin"))
      << p.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(NbdProcessTest, NeverListeningTimesOut) {
  absl::StatusOr<std::unique_ptr<NbdProcess>> p =
      NbdProcess::Start({"sleep", "30"}, absl::Milliseconds(300));
  EXPECT_THAT(p, StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST(MakeImageTest, QemuNbdServesQcow2) {
  TempDir dir;
  const std::string img = dir.File("a.qcow2");
  ASSERT_TRUE(MakeImage(img, "qcow2", 4 << 20, {"write -P 0xab 1M 64k"}).ok());
  absl::StatusOr<std::unique_ptr<NbdProcess>> p =
      NbdProcess::Start({"qemu-nbd", "-k", "{sock}", "-f", "qcow2", img});
  ASSERT_TRUE(p.ok()) << p.status();
  absl::StatusOr<std::string> size =
      RunCommand({"nbdinfo", "--size", (*p)->uri()});
  ASSERT_TRUE(size.ok()) << size.status();
  EXPECT_EQ(*size, "4194304\n");
}

TEST(MakeImageTest, BadQemuIoCommandIsError) {
  TempDir dir;
  absl::Status s = MakeImage(dir.File("b.raw"), "raw", 1 << 20,
                             {"write -P 1 2M 64k"});  // past the end
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInternal)) << s;
}

}  // namespace
}  // namespace blockmeta::testing
