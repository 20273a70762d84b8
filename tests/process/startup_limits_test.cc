// tests/process/startup_limits_test.cc — start-up failures are errors, not
// aborts (issue 21 item 7): blockmetad under real limits (prlimit) with too
// few descriptors, too little address space, and too few pids/threads logs
// `startup_failed` naming the resource and exits 2. A sweep of limits
// around what the server really needs checks that every run either serves
// or exits 2 — never a signal (before, gRPC's GPR_ASSERT on a thread it
// could not create ended in SIGABRT).
//
// Threads: root ignores RLIMIT_NPROC, so as root the server runs under
// setpriv as uid/gid 65534 (a copy of the binary in a world-readable
// directory). A cgroup pids.max limit would do the same; it is not used
// here so the test needs no cgroup delegation.
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

using ::testing::HasSubstr;

class StartupLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A copy any uid can run (runfiles live under root's home).
    char tmpl[] = "/tmp/bmslXXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    binary_ = dir_ + "/blockmetad";
    ASSERT_TRUE(
        RunCommand({"cp", RunfilePath("server/blockmetad"), binary_}).ok());
    ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
    ASSERT_EQ(chmod(binary_.c_str(), 0755), 0);
  }
  void TearDown() override { (void)RunCommand({"rm", "-rf", dir_}); }

  // blockmetad under `prlimit LIMIT`, as uid 65534 when `as_nobody` (and we
  // are root). Runs that start are stopped after `run_for`.
  RunResult Run(const std::string& limit, bool as_nobody = false,
                absl::Duration run_for = absl::Seconds(10)) {
    std::vector<std::string> argv;
    if (as_nobody && geteuid() == 0) {
      argv = {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
              "--clear-groups"};
    }
    for (const std::string& a :
         {std::string("/usr/bin/prlimit"), limit, std::string("--"), binary_,
          std::string("--grpc_listen=127.0.0.1:0"),
          std::string("--log_format=text")}) {
      argv.push_back(a);
    }
    RunOptions o;
    o.timeout = run_for;
    return RunProgram(argv, o);
  }

  std::string dir_, binary_;
};

TEST_F(StartupLimitsTest, TooFewDescriptors) {
  RunResult r = Run("--nofile=20:20");
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("startup_failed"));
  EXPECT_THAT(r.err, HasSubstr("RLIMIT_NOFILE is 20 (hard 20)"));
}

TEST_F(StartupLimitsTest, TooLittleMemory) {
  RunResult r = Run("--as=300000000");
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("startup_failed"));
  EXPECT_THAT(r.err, HasSubstr("RLIMIT_AS"));
}

TEST_F(StartupLimitsTest, TooFewThreads) {
  RunResult r = Run("--nproc=20", /*as_nobody=*/true);
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("startup_failed"));
  EXPECT_THAT(r.err, HasSubstr("cannot start 48 threads"));
}

// Around the real needs (about 30 threads, 64 descriptors and 0.7-0.8 GB
// of address space here): every run serves (still running when stopped) or
// exits 2 with a message; none dies by a signal.
TEST_F(StartupLimitsTest, NoLimitEndsInAnAbort) {
  std::vector<std::pair<std::string, bool>> limits;
  for (int mb = 500; mb <= 1000; mb += 50) {
    limits.push_back({absl::StrCat("--as=", mb * 1000000), false});
  }
  for (int n = 20; n <= 60; n += 5) {
    limits.push_back({absl::StrCat("--nproc=", n), true});
  }
  for (int n : {10, 30, 60, 70}) {
    limits.push_back({absl::StrCat("--nofile=", n, ":", n), false});
  }
  int served = 0, refused = 0;
  for (const auto& [limit, as_nobody] : limits) {
    RunResult r = Run(limit, as_nobody, absl::Seconds(3));
    if (r.timed_out) {
      ++served;  // it started (and was stopped)
      continue;
    }
    ++refused;
    EXPECT_EQ(r.exit_code, 2) << limit << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr("startup_failed")) << limit;
  }
  // The sweep covers both sides of the line.
  EXPECT_GT(served, 0);
  EXPECT_GT(refused, 0);
}

}  // namespace
}  // namespace blockmeta::testing
