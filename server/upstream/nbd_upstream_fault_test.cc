// server/upstream/nbd_upstream_fault_test.cc — NbdUpstream when things go
// wrong: nbdkit's error and delay filters, killed and restarted servers
// (ours and spawned), servers that never come up. Every wait is bounded.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/mutex.h"
#include "server/upstream/nbd_upstream.h"
#include "tests/testing/nbd_process.h"
#include "tests/testing/nbd_upstream_test_util.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

using ::blockmeta::testing::NbdProcess;
using ::blockmeta::testing::RunCommand;
using ::blockmeta::testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;

struct ErrorCase {
  const char* nbdkit_error;
  absl::StatusCode code;
};

class ErrorFilterTest : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(ErrorFilterTest, ServerErrorsMapToClearCodes) {
  const ErrorCase& c = GetParam();
  auto up = Connect(CommandExport(
      {"nbdkit", "--filter=error", "memory", "4M",
       absl::StrCat("error=", c.nbdkit_error), "error-extents-rate=100%",
       "error-pread-rate=100%", "error-pwrite-rate=100%"}));
  ASSERT_NE(up, nullptr);
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, kMiB, Soon());
  EXPECT_THAT(r, StatusIs(c.code)) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "export cmd"))
      << r.status();
  char buf[4096];
  EXPECT_THAT(up->Pread(buf, sizeof buf, 0, Soon()), StatusIs(c.code));
  EXPECT_THAT(up->Pwrite(buf, sizeof buf, 0, 0, Soon()), StatusIs(c.code));
  // An error reply leaves the connection usable: trims are not failing.
  EXPECT_TRUE(up->Trim(4096, 0, 0, Soon()).ok());
  EXPECT_TRUE(up->Ready());
  EXPECT_EQ(up->Generation(), 1u);
}

INSTANTIATE_TEST_SUITE_P(
    Codes, ErrorFilterTest,
    ::testing::Values(ErrorCase{"EIO", absl::StatusCode::kDataLoss},
                      ErrorCase{"EPERM", absl::StatusCode::kPermissionDenied},
                      ErrorCase{"EINVAL", absl::StatusCode::kInvalidArgument},
                      ErrorCase{"ENOSPC",
                                absl::StatusCode::kResourceExhausted}));

TEST(DelayFilterTest, ImpatientCallerCostsNeitherHandleNorGeneration) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-extents=1"});
  config.set_connections(2);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  const uint64_t gen = up->Generation();
  const absl::Time start = absl::Now();
  absl::StatusOr<ExtentList> r = up->BlockStatus(
      "base:allocation", 0, kMiB, absl::Now() + absl::Milliseconds(50));
  const absl::Duration took = absl::Now() - start;
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded)) << r.status();
  EXPECT_GE(took, absl::Milliseconds(45));
  // Well before the 1 s delay ends: the caller's deadline decided.
  EXPECT_LT(took, absl::Milliseconds(900));
  // The command runs on, on a handle that stays up.
  EXPECT_EQ(up->Stats().commands_in_flight, 1u);
  EXPECT_EQ(up->Stats().caller_deadlines_passed, 1u);
  char buf[512];
  EXPECT_TRUE(up->Pread(buf, sizeof buf, 0, Soon()).ok());
  EXPECT_TRUE(Eventually([&] { return up->Stats().commands_in_flight == 0; }));
  const UpstreamStats stats = up->Stats();
  EXPECT_EQ(stats.commands_failed, 0u);
  EXPECT_EQ(stats.commands_timed_out, 0u);
  EXPECT_EQ(stats.connections_lost, 0u);
  EXPECT_EQ(stats.reconnects, 0u);
  EXPECT_EQ(LiveConnectionsForTesting(up.get()), 2);
  EXPECT_EQ(up->Generation(), gen);
  EXPECT_TRUE(up->Ready());

  // The asynchronous form delivers the late answer to whoever still waits.
  std::atomic<bool> done{false};
  absl::StatusOr<ExtentList> late;
  up->AsyncBlockStatus("base:allocation", 0, kMiB,
                       [&](absl::StatusOr<ExtentList> r) {
                         late = std::move(r);
                         done.store(true);
                       });
  ASSERT_TRUE(Eventually([&] { return done.load(); }));
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(late->front().offset, 0u);
  EXPECT_EQ(up->Generation(), gen);
}

TEST(DelayFilterTest, UpstreamTimeoutClosesTheHandleAndReconnects) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-extents=5"});
  config.set_connections(2);
  config.set_upstream_timeout_ms(300);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  const uint64_t gen = up->Generation();
  const absl::Time start = absl::Now();
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, kMiB, absl::InfiniteFuture());
  const absl::Duration took = absl::Now() - start;
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kDeadlineExceeded)) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "upstream_timeout_ms"))
      << r.status();
  EXPECT_GE(took, absl::Milliseconds(290));
  EXPECT_LT(took, absl::Seconds(3));  // not the server's 5 s
  EXPECT_EQ(up->Stats().commands_timed_out, 1u);
  // Other commands are not delayed and keep working meanwhile.
  char buf[512];
  EXPECT_TRUE(up->Pread(buf, sizeof buf, 0, Soon()).ok());
  // The closed connection comes back, as a new generation.
  EXPECT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  EXPECT_GT(up->Generation(), gen);
  EXPECT_EQ(up->Stats().reconnects, 1u);
  EXPECT_TRUE(up->Ready());
}

// Close (an export removed) while every command is slow: nothing waits for
// the server. Callers blocked in synchronous and asynchronous commands
// return at once with Close's reason, the server's late answers are
// dropped, later calls fail the same way, and nothing reconnects.
TEST(DelayFilterTest, CloseFailsCommandsInFlightAtOnce) {
  auto config = CommandExport({"nbdkit", "--filter=delay", "memory", "4M",
                               "delay-extents=5", "delay-read=5"});
  config.set_connections(2);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  sync::Mutex mu;
  std::vector<absl::Status> async_statuses;  // guarded by mu
  for (int i = 0; i < 4; ++i) {
    up->AsyncBlockStatus("base:allocation", 0, kMiB,
                         [&](const absl::StatusOr<ExtentList>& r) {
                           sync::MutexLock lock(&mu);
                           async_statuses.push_back(r.status());
                         });
  }
  absl::Status sync_status;
  std::thread reader([&] {
    char buf[512];
    sync_status = up->Pread(buf, sizeof buf, 0, absl::InfiniteFuture());
  });
  ASSERT_TRUE(Eventually([&] { return up->Stats().commands_in_flight == 5; }));
  const absl::Status why = absl::NotFoundError("export cmd was removed");
  const absl::Time start = absl::Now();
  up->Close(why);
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
  reader.join();
  // Not the server's 5 s: each waiter was failed by Close itself.
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_EQ(sync_status, why);
  ASSERT_TRUE(Eventually([&] {
    sync::MutexLock lock(&mu);
    return async_statuses.size() == 4;
  }));
  {
    sync::MutexLock lock(&mu);
    for (const absl::Status& s : async_statuses) EXPECT_EQ(s, why);
  }
  EXPECT_FALSE(up->Ready());
  EXPECT_EQ(up->LastError(), why.message());
  EXPECT_EQ(up->BlockStatus("base:allocation", 0, kMiB, Soon()).status(), why);
  up->Close(absl::InternalError("again"));  // idempotent: the first reason
  EXPECT_EQ(up->Trim(4096, 0, 0, Soon()), why);
  EXPECT_EQ(LiveConnectionsForTesting(up.get()), 0);
  absl::SleepFor(absl::Milliseconds(300));  // no reconnect round starts
  EXPECT_EQ(LiveConnectionsForTesting(up.get()), 0);
  EXPECT_EQ(up->Stats().commands_in_flight, 0u);
}

TEST(DelayFilterTest, UpstreamTimeoutBoundsCallsWithoutDeadline) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-read=10"});
  config.set_upstream_timeout_ms(200);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  char buf[512];
  const absl::Time start = absl::Now();
  EXPECT_THAT(up->Pread(buf, sizeof buf, 0, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
}

TEST(DelayFilterTest, ABusyHandleServesOtherCommandsMeanwhile) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-extents=2"});
  config.set_connections(1);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  std::atomic<bool> slow_done{false};
  up->AsyncBlockStatus("base:allocation", 0, kMiB,
                       [&](const absl::StatusOr<ExtentList>& r) {
                         EXPECT_TRUE(r.ok()) << r.status();
                         slow_done.store(true);
                       });
  ASSERT_EQ(up->Stats().commands_in_flight, 1u);
  // The one handle carries a read past the slow extents call: no waiting
  // for a free connection.
  const absl::Time start = absl::Now();
  char buf[512];
  EXPECT_TRUE(
      up->Pread(buf, sizeof buf, 0, absl::Now() + absl::Seconds(1)).ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_FALSE(slow_done.load());
  const UpstreamStats stats = up->Stats();
  ASSERT_EQ(stats.connections.size(), 1u);
  EXPECT_EQ(stats.connections[0].max_in_flight, 2u);
  EXPECT_TRUE(Eventually([&] { return slow_done.load(); }));
}

TEST(RestartTest, KilledUriServerFailsFastThenResumes) {
  auto server =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "8M"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto up = Connect(UriExport((*server)->uri()));
  ASSERT_NE(up, nullptr);
  std::atomic<int> callbacks{0};
  up->SetOnGenerationChange([&] { ++callbacks; });
  const uint64_t gen = up->Generation();
  ASSERT_TRUE(up->BlockStatus("base:allocation", 0, kMiB, Soon()).ok());

  (*server)->Kill();
  // Calls fail fast, with UNAVAILABLE, whether or not the loss was noticed.
  for (int i = 0; i < 3; ++i) {
    const absl::Time start = absl::Now();
    absl::StatusOr<ExtentList> r =
        up->BlockStatus("base:allocation", 0, kMiB, Soon());
    EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable)) << r.status();
    // Fast: far below the 10 s deadline the call was given.
    EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  }
  EXPECT_TRUE(Eventually([&] { return !up->Ready(); }));
  EXPECT_NE(up->LastError(), "");
  char buf[512];
  EXPECT_THAT(up->Pread(buf, sizeof buf, 0, Soon()),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(up->Info().ok());  // the last known info stays available

  ASSERT_TRUE((*server)->Restart().ok());
  EXPECT_TRUE(up->WaitReady(absl::Now() + absl::Seconds(15)))
      << up->LastError();
  EXPECT_GT(up->Generation(), gen);
  EXPECT_TRUE(Eventually([&] { return callbacks.load() > 0; }));
  EXPECT_EQ(up->LastError(), "");
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, kMiB, Soon());
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST(RestartTest, KilledSpawnedServerIsRespawned) {
  auto up = Connect(CommandExport({"nbdkit", "memory", "8M"}));
  ASSERT_NE(up, nullptr);
  const pid_t pid = SpawnedServerPidForTesting(up.get());
  ASSERT_GT(pid, 0);
  const uint64_t gen = up->Generation();
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  // The first call after the kill fails with UNAVAILABLE (or, if the
  // respawn already happened, succeeds): never hangs, never another code.
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, kMiB, Soon());
  if (!r.ok()) {
    EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable)) << r.status();
  }
  EXPECT_TRUE(Eventually([&] {
    pid_t now = SpawnedServerPidForTesting(up.get());
    return now > 0 && now != pid && up->Ready();
  }));
  EXPECT_GT(up->Generation(), gen);
  EXPECT_TRUE(Eventually([&] {
    return up->BlockStatus("base:allocation", 0, kMiB, Soon()).ok();
  }));
}

// True once `pid` has exited (left unreaped for its NbdProcess).
bool Exited(pid_t pid) {
  siginfo_t info{};
  return waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
         info.si_pid == pid;
}

TEST(ShutdownTest, IdleUpstreamStoppedBySigtermIsNoticedAndLetGo) {
  auto server =
      NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "memory", "8M"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto config = UriExport((*server)->uri());
  config.set_connections(2);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  const uint64_t gen = up->Generation();

  // nbdkit closes idle connections on SIGTERM: EOF on an idle handle.
  ASSERT_EQ(kill((*server)->pid(), SIGTERM), 0);
  const absl::Time start = absl::Now();
  EXPECT_TRUE(Eventually([&] { return !up->Ready(); }, absl::Seconds(1)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_TRUE(Eventually([&] { return Exited((*server)->pid()); }));
  absl::StatusOr<ExtentList> r =
      up->BlockStatus("base:allocation", 0, kMiB, Soon());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable)) << r.status();

  ASSERT_TRUE((*server)->Restart().ok());  // same socket
  EXPECT_TRUE(up->WaitReady(absl::Now() + absl::Seconds(15)))
      << up->LastError();
  EXPECT_GT(up->Generation(), gen);
  EXPECT_TRUE(up->BlockStatus("base:allocation", 0, kMiB, Soon()).ok());
  EXPECT_EQ(up->Stats().connections_lost, 2u);
  EXPECT_EQ(up->Stats().reconnects, 1u);
}

TEST(ShutdownTest, BusyUpstreamAnsweringEshutdownIsDisconnectedSoftly) {
  TempDir dir;
  const std::string log = dir.File("nbdkit.log");
  auto server = NbdProcess::Start({"nbdkit", "-U", "{sock}", "-f", "-v",
                                   "--filter=log", "--filter=delay", "memory",
                                   "8M", "delay-read=20", "logfile=" + log});
  ASSERT_TRUE(server.ok()) << server.status();
  auto config = UriExport((*server)->uri());
  config.set_connections(1);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  const uint64_t gen = up->Generation();
  std::atomic<bool> done{false};
  absl::Status read_status;
  std::vector<char> buf(4096);
  up->AsyncPread(buf.data(), buf.size(), 0, [&](absl::Status s) {
    read_status = std::move(s);
    done.store(true);
  });
  ASSERT_TRUE(Eventually([&] {
    auto text = RunCommand({"cat", log});
    return text.ok() && absl::StrContains(*text, "Read id=");
  }));

  // A busy nbdkit answers ESHUTDOWN and waits for its clients to leave.
  ASSERT_EQ(kill((*server)->pid(), SIGTERM), 0);
  const absl::Time start = absl::Now();
  EXPECT_TRUE(Eventually([&] { return done.load(); }, absl::Seconds(1)));
  EXPECT_THAT(read_status, StatusIs(absl::StatusCode::kUnavailable))
      << read_status;
  EXPECT_TRUE(absl::StrContains(read_status.message(), "ESHUTDOWN"))
      << read_status;
  EXPECT_TRUE(Eventually([&] { return !up->Ready(); }, absl::Seconds(1)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  // We left (NBD_CMD_DISC), so nbdkit can exit.
  EXPECT_TRUE(Eventually([&] { return Exited((*server)->pid()); }));
  EXPECT_EQ(up->Stats().soft_disconnects, 1u);
  // nbdkit -v logs the soft disconnect it received.
  EXPECT_TRUE(absl::StrContains((*server)->Log(), "NBD_CMD_DISC"))
      << (*server)->Log();

  ASSERT_TRUE((*server)->Restart().ok());
  EXPECT_TRUE(up->WaitReady(absl::Now() + absl::Seconds(15)))
      << up->LastError();
  EXPECT_GT(up->Generation(), gen);
  EXPECT_TRUE(up->BlockStatus("base:allocation", 0, kMiB, Soon()).ok());
}

TEST(StartupTest, MissingSocketIsUnavailableWithReason) {
  auto up = CreateUpstream(UriExport("nbd+unix:///?socket=/nonexistent/s"));
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_FALSE((*up)->WaitReady(absl::Now() + absl::Milliseconds(300)));
  EXPECT_TRUE(Eventually([&] { return (*up)->LastError() != "connecting"; }));
  EXPECT_TRUE(absl::StrContains((*up)->LastError(), "No such file"))
      << (*up)->LastError();
  const absl::Time start = absl::Now();
  absl::StatusOr<ExtentList> r =
      (*up)->BlockStatus("base:allocation", 0, 1, Soon());
  EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable));
  // At once, not after the 10 s deadline.
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_THAT((*up)->Info(), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ((*up)->Generation(), 0u);
}

TEST(StartupTest, FailingCommandReportsItsStderr) {
  auto up = CreateUpstream(CommandExport({"nbdkit", "no-such-plugin-xyz"}));
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_TRUE(Eventually(
      [&] {
        return absl::StrContains((*up)->LastError(), "no-such-plugin-xyz");
      },
      absl::Seconds(10)))
      << (*up)->LastError();
  EXPECT_FALSE((*up)->Ready());
}

TEST(StartupTest, DestroyingAnUpstreamStopsItsServer) {
  auto up = Connect(CommandExport({"nbdkit", "memory", "1M"}));
  ASSERT_NE(up, nullptr);
  const pid_t pid = SpawnedServerPidForTesting(up.get());
  ASSERT_GT(pid, 0);
  const absl::Time start = absl::Now();
  up.reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  EXPECT_NE(kill(pid, 0), 0);  // gone and reaped
}

}  // namespace
}  // namespace blockmeta
