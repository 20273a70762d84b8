// client/command.h — what every `blockmeta` subcommand is made of: its
// table entry (CommandSpec: synopsis, flags, runner) and the context its
// runner gets (CommandContext: parsed flags and arguments, the connected
// client, output streams, and the usage/failure reporting every command
// shares). cli.cc parses the line, connects and dispatches; each topic's
// file (query_commands, map_commands, cache_commands, bench_command,
// export_commands) defines its commands' specs and runners.
//
// Adding a command: write `CommandSpec FooCommand()` in its own file (its
// own cc_library depending on :command), then add one line to the list in
// cli.cc's Commands() (plus the include and the BUILD dep).
//
// Exit codes (also in docs/client.md and `blockmeta --help`):
//   0  success
//   1  the server answered with an error (NOT_FOUND, OUT_OF_RANGE, ...)
//   2  usage error (unknown command or flag, bad value, missing argument)
//   3  unavailable (retryable): no server there (the connection was refused
//      or failed), or the server answered UNAVAILABLE; the message tells
//      which
//   4  deadline exceeded (--timeout)
//   5  health: the service is not SERVING
#ifndef BLOCKMETA_CLIENT_COMMAND_H_
#define BLOCKMETA_CLIENT_COMMAND_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "blockmeta/v1/blockmeta.pb.h"
#include "client/blockmeta_client.h"
#include "client/client_options.h"

namespace google::protobuf {
class Message;
}  // namespace google::protobuf

namespace blockmeta::client {

inline constexpr char kProg[] = "blockmeta";

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
  // When set, RunCli calls it with the exit code once a command that
  // connected has finished, while the gRPC client (and its channel) still
  // exists, and the call must not return: main.cc flushes the output and
  // leaves the process with _exit there, so gRPC's teardown never runs (see
  // main.cc). Unset (in-process tests), RunCli destroys the client and
  // returns the code.
  std::function<void(int exit_code)> exit_process;
};

struct FlagSpec {
  std::string name;        // Without the leading "--".
  std::string value_name;  // Empty: a boolean flag that takes no value.
  std::string help;
};

class CommandContext;

struct CommandSpec {
  std::string name;
  std::string args;  // Positional synopsis, e.g. "EXPORT".
  std::string summary;
  std::string details;  // Extra help paragraph; may be empty.
  int min_positional = 0;
  int max_positional = 0;
  std::vector<FlagSpec> flags;
  // Runs the command once its arguments are counted and the client is set
  // up (or, when !connects, straight after parsing). Returns the exit code.
  int (*run)(CommandContext& ctx) = nullptr;
  bool connects = true;
};

// A parsed command line.
struct Invocation {
  const CommandSpec* command = nullptr;
  std::map<std::string, std::string> flags;  // name -> value ("" for bools)
  std::vector<std::string> positional;
  bool help = false;
};

// Flags several commands share, with the same help text everywhere.
extern const FlagSpec kOutputBasicFlag;  // --output: human or json
extern const FlagSpec kOffsetFlag;
extern const FlagSpec kLengthFlag;
extern const FlagSpec kCacheFlag;
// map's context when --context is not given.
inline constexpr char kDefaultContext[] = "base:allocation";

// "(default 16)", "(default 10s)", "(default 1M)": the help text of a
// default, from the struct that holds it (so each default has one home).
std::string DefaultText(int64_t v);
std::string DefaultText(absl::Duration d);
std::string DefaultSizeText(uint64_t bytes);

// Everything a command's runner uses. Not thread-safe; lives for one run.
class CommandContext {
 public:
  CommandContext(const CliEnvironment& env, Invocation invocation);

  // Counts the arguments, connects (for commands that connect) and runs
  // the command through its table entry.
  int Run();

  const CommandSpec& command() const { return *inv_.command; }
  const std::vector<std::string>& positional() const { return inv_.positional; }
  const std::map<std::string, std::string>& flags() const { return inv_.flags; }
  bool Has(const std::string& name) const { return inv_.flags.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& def = "") const;

  std::ostream& out() { return out_; }
  std::ostream& err() { return err_; }
  const CliEnvironment& env() const { return env_; }
  // Set up once Run() has connected (commands with `connects`).
  const ClientOptions& options() const { return options_; }
  BlockMetaClient& client() { return *client_; }

  // Prints a usage error for this command; returns kExitUsage.
  int Usage(absl::string_view message);
  // Prints a failed call (`what` names it) and, for UNAVAILABLE, either a
  // hint about --server (no server there: IsServerUnreachable) or that the
  // server answered it; returns ExitCodeForStatus(s).
  int Fail(absl::string_view what, const absl::Status& s);

  // Flag parsers: nullopt when the flag is absent or valid (then *out is
  // set), else a usage error message.
  std::optional<std::string> SizeFlag(const std::string& name, uint64_t* out);
  std::optional<std::string> IntFlag(const std::string& name, int min, int max,
                                     int* out);
  std::optional<std::string> DurationFlag(const std::string& name,
                                          absl::Duration* out,
                                          bool allow_zero = false);
  std::optional<std::string> CacheFlag(v1::CacheMode* mode);
  // --output=human|json.
  std::optional<std::string> BasicOutput(bool* json);

  // The message as indented JSON with proto field names.
  static std::string ProtoJson(const google::protobuf::Message& m);

 private:
  std::optional<std::string> SetUpClient();

  const CliEnvironment& env_;
  std::ostream& out_;
  std::ostream& err_;
  const Invocation inv_;
  ClientOptions options_;
  std::unique_ptr<BlockMetaClient> client_;
};

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_COMMAND_H_
