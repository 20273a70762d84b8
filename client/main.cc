// client/main.cc — the `blockmeta` CLI binary; all logic is in cli.cc.
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "client/cli.h"

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(false);
  std::vector<std::string> args(argv, argv + argc);
  blockmeta::client::CliEnvironment env;
  env.out = &std::cout;
  env.err = &std::cerr;
  env.err_is_tty = isatty(STDERR_FILENO) == 1;
  // NOLINTNEXTLINE(concurrency-mt-unsafe): read before any thread starts.
  if (const char* s = std::getenv("BLOCKMETA_SERVER")) env.default_server = s;
  int code = blockmeta::client::RunCli(args, env);
  std::cout.flush();
  return code;
}
