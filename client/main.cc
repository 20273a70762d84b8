// client/main.cc — the `blockmeta` CLI binary; all logic is in cli.cc.
//
// The process ends with _exit once its output is flushed, without running
// the gRPC channel's destructor or gRPC's shutdown. grpc++ 1.51 can hang
// there: its EventEngine's TimerManager::Shutdown waits on a condition
// variable that a timer thread which already left never signals (a CLI in a
// loop hung once in ~1,000 runs; grpc/grpc PR 30751 describes the same
// missed wake-up). A process that exits has nothing left to clean up: the
// kernel closes the connection, and the server sees an ordinary disconnect.
// A watchdog thread, by contrast, would only bound the hang, not avoid it.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "client/cli.h"

namespace {

[[noreturn]] void FlushAndExit(int code) {
  std::cout.flush();
  std::cerr.flush();
  // stdout may be a closed pipe (`blockmeta map ... | head`): the write
  // error is the reader's choice, not ours to report.
  (void)std::fflush(nullptr);
  _exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(false);
  std::vector<std::string> args(argv, argv + argc);
  blockmeta::client::CliEnvironment env;
  env.out = &std::cout;
  env.err = &std::cerr;
  env.err_is_tty = isatty(STDERR_FILENO) == 1;
  // NOLINTNEXTLINE(concurrency-mt-unsafe): read before any thread starts.
  if (const char* s = std::getenv("BLOCKMETA_SERVER")) env.default_server = s;
  env.exit_process = FlushAndExit;
  FlushAndExit(blockmeta::client::RunCli(args, env));
}
