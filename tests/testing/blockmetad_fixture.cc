// tests/testing/blockmetad_fixture.cc — see blockmetad_fixture.h.
#include "tests/testing/blockmetad_fixture.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/testing/eventually.h"

namespace blockmeta::testing {

absl::StatusOr<std::unique_ptr<Blockmetad>> Blockmetad::Start(
    const std::vector<std::pair<std::string, std::string>>& exports,
    const std::vector<std::string>& extra_flags) {
  std::vector<std::string> argv = {RunfilePath("server/blockmetad"),
                                   "--grpc_unix_socket={sock}",
                                   "--log_format=text"};
  for (const auto& [name, uri] : exports) {
    argv.push_back(absl::StrCat("--export=", name, "=", uri));
  }
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  auto process = NbdProcess::Start(argv);
  if (!process.ok()) return process.status();
  auto d = std::unique_ptr<Blockmetad>(new Blockmetad);
  d->process_ = *std::move(process);
  return d;
}

RunResult Blockmetad::AwaitHealth(const std::string& service,
                                  const std::string& want,
                                  absl::Duration timeout) const {
  RunResult r;
  Eventually(
      [&] {
        r = Cli({"health", service});
        return r.out == want;
      },
      timeout, absl::Milliseconds(100));
  return r;
}

RunResult Blockmetad::Cli(std::vector<std::string> args,
                          RunOptions options) const {
  args.insert(args.begin(), RunfilePath("client/blockmeta"));
  args.push_back("--server=" + target());
  options.unset_env.push_back("BLOCKMETA_SERVER");
  return RunProgram(args, options);
}

}  // namespace blockmeta::testing
