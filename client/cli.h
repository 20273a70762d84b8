// client/cli.h — the `blockmeta` command line (subcommands list, info, map,
// changed, du, invalidate, stats, health, bench, export, help), built on
// //client:blockmeta_client. main.cc is a thin wrapper so tests can run the
// whole CLI in-process too. Exit codes and CliEnvironment: command.h.
#ifndef BLOCKMETA_CLIENT_CLI_H_
#define BLOCKMETA_CLIENT_CLI_H_

#include <string>
#include <vector>

#include "client/command.h"

namespace blockmeta::client {

// Runs the CLI on `args` (args[0] is the program name) and returns the exit
// code. Writes results to env.out and diagnostics to env.err only.
int RunCli(const std::vector<std::string>& args, const CliEnvironment& env);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_CLI_H_
