// server/common/startup_resources_test.cc — CheckStartupResources under
// real limits, each in a forked child (setrlimit there, never here): it
// passes with the test's own limits and names the resource that ran out
// under a low RLIMIT_NOFILE or RLIMIT_AS.
#include "server/common/startup_resources.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <string>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

// Runs `limit` then the check in a child; returns its status code and
// whether the message contains `want` (as the child's exit code: code * 2 +
// found).
struct Outcome {
  absl::StatusCode code;
  bool mentions;
};

Outcome InChild(const std::function<void()>& limit, const std::string& want) {
  pid_t pid = fork();
  if (pid == 0) {
    limit();
    absl::Status s = CheckStartupResources(StartupNeeds());
    bool found = std::string(s.message()).find(want) != std::string::npos;
    _exit(static_cast<int>(s.code()) * 2 + (found ? 1 : 0));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status)) << "the check crashed: " << status;
  int v = WEXITSTATUS(status);
  return {static_cast<absl::StatusCode>(v / 2), (v % 2) == 1};
}

TEST(StartupResources, PassesWithOrdinaryLimits) {
  EXPECT_TRUE(CheckStartupResources(StartupNeeds()).ok());
  Outcome o = InChild([] {}, "");
  EXPECT_EQ(o.code, absl::StatusCode::kOk);
}

TEST(StartupResources, NamesTooFewDescriptors) {
  Outcome o = InChild(
      [] {
        struct rlimit rl = {16, 16};  // hard too: it cannot be raised
        setrlimit(RLIMIT_NOFILE, &rl);
      },
      "RLIMIT_NOFILE is 16 (hard 16)");
  EXPECT_EQ(o.code, absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(o.mentions);
}

TEST(StartupResources, RaisesTheSoftDescriptorLimit) {
  Outcome o = InChild(
      [] {
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = 16;  // soft only: the check raises it
        setrlimit(RLIMIT_NOFILE, &rl);
      },
      "");
  EXPECT_EQ(o.code, absl::StatusCode::kOk);
}

TEST(StartupResources, NamesTooLittleAddressSpace) {
  Outcome o = InChild(
      [] {
        struct rlimit rl = {64 << 20, 64 << 20};
        setrlimit(RLIMIT_AS, &rl);
      },
      "RLIMIT_AS");
  EXPECT_EQ(o.code, absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(o.mentions);
}

}  // namespace
}  // namespace blockmeta
