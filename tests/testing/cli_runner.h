// tests/testing/cli_runner.h — test support: runs the `blockmeta` CLI (or any
// program) as a child process and captures exit code, stdout and stderr,
// with a timeout; optionally with stderr on a pseudo-terminal (to see the
// progress bar a person would see).
//
// The child runs in its own process group and is killed (SIGKILL) when the
// timeout passes; Run() always reaps it. Thread-safe (no shared state).
#ifndef BLOCKMETA_TESTS_TESTING_CLI_RUNNER_H_
#define BLOCKMETA_TESTS_TESTING_CLI_RUNNER_H_

#include <string>
#include <vector>

#include "absl/time/time.h"

namespace blockmeta::testing {

struct RunResult {
  int exit_code = -1;  // -1 when killed by a signal (or the timeout).
  bool timed_out = false;
  std::string out;
  std::string err;
  absl::Duration elapsed;
};

struct RunOptions {
  absl::Duration timeout = absl::Seconds(60);
  // Extra "NAME=VALUE" environment entries (added to the parent's).
  std::vector<std::string> env;
  // Names removed from the environment.
  std::vector<std::string> unset_env;
  // Give the child a pseudo-terminal as stderr.
  bool stderr_tty = false;
};

RunResult RunProgram(const std::vector<std::string>& argv,
                     const RunOptions& options = RunOptions());

// Path of a file in this test's runfiles, e.g. "client/blockmeta".
std::string RunfilePath(const std::string& workspace_relative);

}  // namespace blockmeta::testing

#endif  // BLOCKMETA_TESTS_TESTING_CLI_RUNNER_H_
