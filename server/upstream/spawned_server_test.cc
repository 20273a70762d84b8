// server/upstream/spawned_server_test.cc — socket-activated servers: one
// process serves many connections, restarts reuse the socket path, and
// stopping always reaps.
#include "server/upstream/spawned_server.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/testing/eventually.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using ::blockmeta::testing::Eventually;
using ::blockmeta::testing::RunCommand;

std::string Uri(const SpawnedServer& s) {
  return absl::StrCat("nbd+unix:///?socket=", s.socket_path());
}

TEST(SpawnedServerTest, NbdkitBySocketActivation) {
  auto s = SpawnedServer::Create({"nbdkit", "memory", "3M"});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Start().ok());
  const pid_t pid = (*s)->pid();
  EXPECT_GT(pid, 0);
  for (int i = 0; i < 3; ++i) {  // the same process serves every client
    auto out = RunCommand({"nbdinfo", "--size", Uri(**s)}, absl::Seconds(10));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, "3145728\n");
  }
  EXPECT_TRUE((*s)->Running());
  EXPECT_EQ((*s)->pid(), pid);
  (*s)->Stop();
  EXPECT_FALSE((*s)->Running());
  EXPECT_EQ((*s)->pid(), -1);
  EXPECT_NE(kill(pid, 0), 0);
  // Nobody listens any more: connecting fails at once.
  auto out = RunCommand({"nbdinfo", "--size", Uri(**s)}, absl::Seconds(5));
  EXPECT_FALSE(out.ok());
}

TEST(SpawnedServerTest, QemuNbdPersistentAndShared) {
  blockmeta::testing::TempDir dir;
  const std::string img = dir.File("a.raw");
  ASSERT_TRUE(blockmeta::testing::MakeImage(img, "raw", 1 << 20).ok());
  auto s = SpawnedServer::Create(
      {"qemu-nbd", "-f", "raw", "--shared=0", "--persistent", "--", img});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Start().ok());
  for (int i = 0; i < 2; ++i) {
    auto out = RunCommand({"nbdinfo", "--size", Uri(**s)}, absl::Seconds(10));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, "1048576\n");
  }
}

TEST(SpawnedServerTest, DeathIsNoticedWithStderr) {
  auto s = SpawnedServer::Create({"nbdkit", "no-such-plugin-abc"});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Start().ok());
  EXPECT_TRUE(Eventually([&] { return !(*s)->Running(); }, absl::Seconds(10)));
  EXPECT_TRUE(absl::StrContains((*s)->ExitDescription(), "exited with status"))
      << (*s)->ExitDescription();
  EXPECT_TRUE(absl::StrContains((*s)->ExitDescription(), "no-such-plugin-abc"))
      << (*s)->ExitDescription();
}

// A program that cannot be run fails Start() itself (the exec pipe), with
// the errno, not a later connect error.
TEST(SpawnedServerTest, MissingProgram) {
  auto s = SpawnedServer::Create({"/nonexistent/server"});
  ASSERT_TRUE(s.ok()) << s.status();
  absl::Status started = (*s)->Start();
  EXPECT_THAT(started, StatusIs(absl::StatusCode::kFailedPrecondition))
      << started;
  EXPECT_TRUE(absl::StrContains(started.message(),
                                "cannot run /nonexistent/server: No such file"))
      << started;
  EXPECT_FALSE((*s)->Running());
  EXPECT_TRUE(absl::StrContains((*s)->ExitDescription(), "status 127"))
      << (*s)->ExitDescription();
}

// A command that exits at once: its status, when, and its last stderr lines.
TEST(SpawnedServerTest, ExitAtOnceIsDescribedWithStatusAndStderr) {
  auto s = SpawnedServer::Create(
      {"sh", "-c", "echo first line >&2; echo the last words >&2; exit 3"});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Start().ok());
  ASSERT_TRUE(Eventually([&] { return !(*s)->Running(); }, absl::Seconds(10)));
  const std::string d = (*s)->ExitDescription();
  EXPECT_TRUE(absl::StrContains(d, "exited with status 3 ")) << d;
  EXPECT_TRUE(absl::StrContains(d, " ms after start: ")) << d;
  EXPECT_TRUE(absl::StrContains(d, "first line\nthe last words")) << d;
  EXPECT_EQ((*s)->InconsistentBitmapExits(), 0u);
}

// A qcow2 bitmap left in use by a killed qemu-nbd: the next qemu-nbd exits,
// and the exit says what happened and what to do, and is counted.
TEST(SpawnedServerTest, InconsistentBitmapIsReportedClearly) {
  blockmeta::testing::TempDir dir;
  const std::string img = dir.File("b.qcow2");
  ASSERT_TRUE(blockmeta::testing::MakeImage(img, "qcow2", 8 << 20).ok());
  ASSERT_TRUE(RunCommand({"qemu-img", "bitmap", "--add", img, "b0"}).ok());
  {
    auto killed = blockmeta::testing::NbdProcess::Start(
        {"qemu-nbd", "-k", "{sock}", "-f", "qcow2", "--persistent", "-B", "b0",
         img});
    ASSERT_TRUE(killed.ok()) << killed.status();
    // Serving (the bitmap is marked in use once the image is open) ...
    auto dirty =
        RunCommand({"nbdinfo", "--map=qemu:dirty-bitmap:b0", (*killed)->uri()},
                   absl::Seconds(10));
    ASSERT_TRUE(dirty.ok()) << dirty.status();
    (*killed)->Kill();  // ... SIGKILL: the bitmap stays marked in use
  }
  auto s = SpawnedServer::Create({"qemu-nbd", "-f", "qcow2", "--shared=0",
                                  "--persistent", "-B", "b0", "--", img},
                                 "disk");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Start().ok());
  ASSERT_TRUE(Eventually([&] { return !(*s)->Running(); }, absl::Seconds(10)));
  const std::string d = (*s)->ExitDescription();
  EXPECT_TRUE(absl::StartsWith(d, "found a qcow2 dirty bitmap inconsistent"))
      << d;
  EXPECT_TRUE(absl::StrContains(d, "qemu-img bitmap --remove")) << d;
  EXPECT_TRUE(absl::StrContains(d, "Bitmap 'b0' is inconsistent")) << d;
  EXPECT_EQ((*s)->InconsistentBitmapExits(), 1u);
}

TEST(SpawnedServerTest, StopKillsAServerIgnoringSigterm) {
  // The child says when its trap is installed by creating `ready`.
  const std::string ready =
      // NOLINTNEXTLINE(concurrency-mt-unsafe): no other thread runs yet.
      absl::StrCat(std::getenv("TEST_TMPDIR"), "/trap-installed");
  auto s = SpawnedServer::Create(
      {"sh", "-c", absl::StrCat("trap '' TERM; : > '", ready, "'; sleep 30")});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Start().ok());
  struct stat st;
  ASSERT_TRUE(Eventually([&] { return stat(ready.c_str(), &st) == 0; }));
  const absl::Time start = absl::Now();
  (*s)->Stop(absl::Milliseconds(200));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_FALSE((*s)->Running());
}

TEST(SpawnedServerTest, EmptyArgvIsInvalid) {
  EXPECT_THAT(SpawnedServer::Create({}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SpawnedServerTest, DirectoryRemoved) {
  std::string sock;
  {
    auto s = SpawnedServer::Create({"nbdkit", "memory", "1M"});
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->Start().ok());
    sock = (*s)->socket_path();
  }
  struct stat st;
  EXPECT_NE(stat(sock.c_str(), &st), 0);
}

// A child forked from a thread that then exits must keep running: the
// parent-death signal follows the forking thread, so forks happen on the
// process-long spawner thread.
TEST(SpawnedServerTest, SurvivesTheThreadThatStartedIt) {
  std::unique_ptr<SpawnedServer> server;
  std::thread([&] {
    auto s = SpawnedServer::Create({"nbdkit", "-f", "memory", "1M"});
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->Start().ok());
    server = *std::move(s);
  }).join();
  ASSERT_NE(server, nullptr);
  // The thing under test is survival over time: give a wrongly signalled
  // child time to die.
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(server->Running()) << server->ExitDescription();
}

TEST(SpawnedServerTest, StaleDirectoriesOfDeadOwnersAreRemoved) {
  char tmpl[] = "/tmp/bm-stale-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string base = tmpl;
  // Set and unset on this thread, between spawns: no getenv runs then.
  setenv("TMPDIR", base.c_str(), 1);  // NOLINT(concurrency-mt-unsafe)
  // A directory whose owner is gone (no such pid, or another start time).
  const std::string stale = base + "/blockmeta-dead01";
  ASSERT_EQ(mkdir(stale.c_str(), 0700), 0);
  { std::ofstream(stale + "/owner") << "999999999 12345\n"; }
  { std::ofstream(stale + "/server.log") << "old\n"; }
  // Ours, alive.
  auto mine = SpawnedServer::Create({"nbdkit", "memory", "1M"});
  ASSERT_TRUE(mine.ok());
  // Not ours at all (no owner file): left alone.
  const std::string foreign = base + "/blockmeta-foreign";
  ASSERT_EQ(mkdir(foreign.c_str(), 0700), 0);

  EXPECT_EQ(CleanStaleSpawnDirs(), 1);
  struct stat st;
  EXPECT_NE(stat(stale.c_str(), &st), 0);
  EXPECT_EQ(stat((*mine)
                     ->socket_path()
                     .substr(0, (*mine)->socket_path().rfind('/'))
                     .c_str(),
                 &st),
            0);
  EXPECT_EQ(stat(foreign.c_str(), &st), 0);
  mine->reset();
  rmdir(foreign.c_str());
  unsetenv("TMPDIR");  // NOLINT(concurrency-mt-unsafe): as setenv above
  EXPECT_EQ(rmdir(base.c_str()), 0);
}

// The server of a dead owner may still be exiting (closing its bitmaps,
// holding the image lock): cleaning waits until it is gone.
TEST(SpawnedServerTest, StaleDirectoryWaitsForItsServerToExit) {
  char tmpl[] = "/tmp/bm-stale-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string base = tmpl;
  // A stand-in for the old server: exits by itself 1 s from now.
  const pid_t server = fork();
  ASSERT_GE(server, 0);
  if (server == 0) {
    execlp("sleep", "sleep", "1", nullptr);
    _exit(127);
  }
  std::string start;
  ASSERT_TRUE(Eventually([&] {
    std::ifstream in(absl::StrCat("/proc/", server, "/stat"));
    std::string line;
    if (!std::getline(in, line) || line.find("(sleep)") == std::string::npos)
      return false;  // not exec'd yet
    std::istringstream fields(line.substr(line.rfind(')') + 2));
    for (int i = 3; i <= 22 && (fields >> start); ++i) {
    }
    return !start.empty();
  }));
  setenv("TMPDIR", base.c_str(), 1);  // NOLINT(concurrency-mt-unsafe)
  const std::string stale = base + "/blockmeta-dead02";
  ASSERT_EQ(mkdir(stale.c_str(), 0700), 0);
  { std::ofstream(stale + "/owner") << "999999999 12345\n"; }
  { std::ofstream(stale + "/server") << server << " " << start << "\n"; }
  EXPECT_EQ(CleanStaleSpawnDirs(), 1);
  unsetenv("TMPDIR");  // NOLINT(concurrency-mt-unsafe)
  // It has exited by now (a zombie of ours: reaped here without waiting).
  int st = 0;
  EXPECT_EQ(waitpid(server, &st, WNOHANG), server);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  EXPECT_EQ(rmdir(base.c_str()), 0);
}

}  // namespace
}  // namespace blockmeta
