// server/upstream/nbd_upstream_fault_test.cc — NbdUpstream when things go
// wrong: nbdkit's error and delay filters, killed and restarted servers
// (ours and spawned), servers that never come up. Every wait is bounded.
#include <signal.h>

#include <atomic>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/upstream/nbd_upstream.h"
#include "server/upstream/nbd_upstream_test_util.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::NbdProcess;

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
  EXPECT_EQ(r.status().code(), c.code) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "export cmd"))
      << r.status();
  char buf[4096];
  EXPECT_EQ(up->Pread(buf, sizeof buf, 0, Soon()).code(), c.code);
  EXPECT_EQ(up->Pwrite(buf, sizeof buf, 0, 0, Soon()).code(), c.code);
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

TEST(DelayFilterTest, DeadlineExceededThenThePoolRecovers) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-extents=5"});
  config.set_connections(2);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  ASSERT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  const uint64_t gen = up->Generation();
  const absl::Time start = absl::Now();
  absl::StatusOr<ExtentList> r = up->BlockStatus(
      "base:allocation", 0, kMiB, absl::Now() + absl::Milliseconds(300));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded)
      << r.status();
  EXPECT_GE(took, absl::Milliseconds(290));
  // Well before the 5 s delay ends: the deadline, not the server, decided.
  EXPECT_LT(took, absl::Seconds(3));
  // Other commands are not delayed and keep working meanwhile.
  char buf[512];
  EXPECT_TRUE(up->Pread(buf, sizeof buf, 0, Soon()).ok());
  // The dropped connection comes back.
  EXPECT_TRUE(
      Eventually([&] { return LiveConnectionsForTesting(up.get()) == 2; }));
  EXPECT_GT(up->Generation(), gen);  // a reconnect is a new generation
  EXPECT_TRUE(up->Ready());
}

TEST(DelayFilterTest, UpstreamTimeoutBoundsCallsWithoutDeadline) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-read=10"});
  config.set_upstream_timeout_ms(200);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  char buf[512];
  const absl::Time start = absl::Now();
  EXPECT_EQ(up->Pread(buf, sizeof buf, 0, absl::InfiniteFuture()).code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
}

TEST(DelayFilterTest, WaitingForABusyPoolRespectsTheDeadline) {
  auto config = CommandExport(
      {"nbdkit", "--filter=delay", "memory", "4M", "delay-extents=2"});
  config.set_connections(1);
  auto up = Connect(config);
  ASSERT_NE(up, nullptr);
  std::thread slow(
      [&] { (void)up->BlockStatus("base:allocation", 0, kMiB, Soon()); });
  absl::SleepFor(absl::Milliseconds(200));  // let `slow` take the handle
  const absl::Time start = absl::Now();
  char buf[512];
  EXPECT_EQ(up->Pread(buf, sizeof buf, 0, absl::Now() + absl::Milliseconds(200))
                .code(),
            absl::StatusCode::kDeadlineExceeded);
  // Not after the busy call's 2 s: the waiter's own deadline decided.
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(1500));
  slow.join();
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
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
    // Fast: far below the 10 s deadline the call was given.
    EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  }
  EXPECT_TRUE(Eventually([&] { return !up->Ready(); }));
  EXPECT_NE(up->LastError(), "");
  char buf[512];
  EXPECT_EQ(up->Pread(buf, sizeof buf, 0, Soon()).code(),
            absl::StatusCode::kUnavailable);
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
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
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
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  // At once, not after the 10 s deadline.
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  EXPECT_EQ((*up)->Info().status().code(), absl::StatusCode::kUnavailable);
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
