// tests/testing/blockmetad_fixture.h — test support: a real blockmetad
// (//server:blockmetad from runfiles) serving gRPC on a Unix socket in a
// temp dir, in front of given NBD exports, plus a helper to run the
// `blockmeta` CLI against it. The server process is killed and reaped by the
// destructor (it runs under tests/testing's NbdProcess, which waits for the
// socket to accept connections and owns the process group).
#ifndef BLOCKMETA_TESTS_TESTING_BLOCKMETAD_FIXTURE_H_
#define BLOCKMETA_TESTS_TESTING_BLOCKMETAD_FIXTURE_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/testing/cli_runner.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta::testing {

class Blockmetad {
 public:
  // exports: (name, NBD URI) pairs.
  static absl::StatusOr<std::unique_ptr<Blockmetad>> Start(
      const std::vector<std::pair<std::string, std::string>>& exports,
      const std::vector<std::string>& extra_flags = {});

  // "unix:PATH".
  std::string target() const { return "unix:" + process_->socket_path(); }
  std::string Log() const { return process_->Log(); }
  NbdProcess& process() { return *process_; }

  // Polls `blockmeta health SERVICE` until it prints `want` ("SERVING\n" or
  // "NOT_SERVING\n"; the server refreshes per-export health every 500 ms),
  // at most `timeout`. Returns the last run.
  RunResult AwaitHealth(const std::string& service, const std::string& want,
                        absl::Duration timeout = absl::Seconds(10)) const;

  // Runs `blockmeta ARGS --server=target()`.
  RunResult Cli(std::vector<std::string> args,
                RunOptions options = RunOptions()) const;

 private:
  std::unique_ptr<NbdProcess> process_;
};

}  // namespace blockmeta::testing

#endif  // BLOCKMETA_TESTS_TESTING_BLOCKMETAD_FIXTURE_H_
