// client/cli.h — the `blockmeta` command line (subcommands list, info, map,
// changed, du, invalidate, stats, health, bench, help), built on
// //client:blockmeta_client. main.cc is a thin wrapper so tests can run the
// whole CLI in-process too.
//
// Exit codes (also in docs/client.md and `blockmeta --help`):
//   0  success
//   1  the server answered with an error (NOT_FOUND, OUT_OF_RANGE, ...)
//   2  usage error (unknown command or flag, bad value, missing argument)
//   3  unavailable: the server could not be reached, or answered UNAVAILABLE
//   4  deadline exceeded (--timeout)
//   5  health: the service is not SERVING
#ifndef BLOCKMETA_CLIENT_CLI_H_
#define BLOCKMETA_CLIENT_CLI_H_

#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace blockmeta::client {

inline constexpr int kExitOk = 0;
inline constexpr int kExitRpcError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitUnavailable = 3;
inline constexpr int kExitDeadline = 4;
inline constexpr int kExitNotServing = 5;

// The exit code for a failed call's status (1, 3 or 4).
int ExitCodeForStatus(const absl::Status& status);

struct CliEnvironment {
  std::ostream* out = nullptr;
  std::ostream* err = nullptr;
  // Whether `err` is a terminal: the map progress bar is drawn only then
  // (unless --progress says otherwise).
  bool err_is_tty = false;
  // $BLOCKMETA_SERVER, the default of --server when set and non-empty.
  std::string default_server;
};

// Runs the CLI on `args` (args[0] is the program name) and returns the exit
// code. Writes results to env.out and diagnostics to env.err only.
int RunCli(const std::vector<std::string>& args, const CliEnvironment& env);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_CLI_H_
