// tests/client/cli_exit_test.cc — the `blockmeta` CLI always exits (issue
// 21 item 6). grpc++ 1.51 could hang while the CLI's channel was destroyed
// at exit (EventEngine TimerManager::Shutdown); one `export add` in ~1,000
// never returned. 2,000 runs of the commands an orchestrator calls, against
// a real blockmetad in front of nbdkit, four at a time, each bounded by a
// timeout far above its normal run time: none may time out, and each must
// exit 0 with its whole output.
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/blockmetad_fixture.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {
namespace {

TEST(CliExit, TwoThousandRunsAllExit) {
  auto k = NbdProcess::Start({"nbdkit", "-f", "-U", "{sock}", "memory", "16M"});
  ASSERT_TRUE(k.ok()) << k.status();
  auto s = Blockmetad::Start({{"mem", (*k)->uri()}});
  ASSERT_TRUE(s.ok()) << s.status();
  const Blockmetad& server = **s;
  ASSERT_EQ(server.AwaitHealth("blockmeta.v1.BlockMeta", "SERVING\n").out,
            "SERVING\n")
      << server.Log();
  const std::string uri = (*k)->uri();

  // The commands an orchestrator runs, each with what its output must hold.
  struct Case {
    std::vector<std::string> args;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{"export", "add", "extra", "--uri=" + uri}, "extra READY api"},
      {{"export", "list"}, "mem READY file"},
      {{"list"}, "mem"},
      {{"health"}, "SERVING"},
      {{"info", "mem"}, "16.0 MiB"},
      {{"map", "mem", "--output=nbdinfo"}, "hole,zero"},
  };
  constexpr int kRuns = 2000;
  constexpr int kThreads = 4;
  std::atomic<int> next{0};
  absl::Mutex mu;
  std::vector<std::string> failures;  // guarded by mu
  int hangs = 0;                      // guarded by mu
  absl::Duration slowest;             // guarded by mu
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = next++; i < kRuns; i = next++) {
        const Case& c = cases[i % cases.size()];
        RunOptions o;
        // A run takes well under a second; only a hang reaches this.
        o.timeout = absl::Seconds(30);
        RunResult r = server.Cli(c.args, o);
        absl::MutexLock lock(&mu);
        slowest = std::max(slowest, r.elapsed);
        if (r.timed_out) ++hangs;
        if (r.timed_out || r.exit_code != 0 ||
            r.out.find(c.expect) == std::string::npos) {
          if (failures.size() < 5) {
            failures.push_back(
                absl::StrCat("run ", i, " (", c.args[0], "): exit ",
                             r.exit_code, r.timed_out ? " TIMED OUT" : "",
                             "\nout: ", r.out, "\nerr: ", r.err));
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(hangs, 0);
  EXPECT_TRUE(failures.empty()) << failures[0] << "\n" << server.Log();
  std::cerr << kRuns << " runs, slowest " << slowest << "\n";
}

}  // namespace
}  // namespace blockmeta::testing
