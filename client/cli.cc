// client/cli.cc — see cli.h. The dispatcher: the command list (Commands()),
// the global flags, parsing, help, and `help` itself. Each command's spec
// and runner live in its topic's file (see command.h); registering a command
// is one line in Commands().
#include "client/cli.h"

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "client/bench_command.h"
#include "client/cache_commands.h"
#include "client/du_command.h"
#include "client/export_commands.h"
#include "client/map_commands.h"
#include "client/query_commands.h"
#include "common/quote.h"

namespace blockmeta::client {
namespace {

int RunHelp(CommandContext& ctx);

CommandSpec HelpCommand() {
  return {"help", "[COMMAND]", "show help for blockmeta or a command",
          "",     0,           1,
          {},     &RunHelp,    /*connects=*/false};
}

// The command table, in help order.
const std::vector<CommandSpec>& Commands() {
  static const auto* commands = new std::vector<CommandSpec>{
      ListCommand(),  InfoCommand(),       MapCommand(),   ChangedCommand(),
      DuCommand(),    InvalidateCommand(), StatsCommand(), HealthCommand(),
      BenchCommand(), ExportCommand(),     HelpCommand(),
  };
  return *commands;
}

const std::vector<FlagSpec>& GlobalFlags() {
  static const auto* flags = new std::vector<FlagSpec>{
      {"server", "ADDR",
       absl::StrCat("server address, host:port or unix:PATH (default "
                    "$BLOCKMETA_SERVER, else ",
                    ClientOptions().target, ")")},
      {"tls", "", "connect with TLS (implied by the --tls-* flags)"},
      {"tls-ca", "FILE", "PEM CA bundle that signs the server certificate"},
      {"tls-cert", "FILE", "PEM client certificate, for mutual TLS"},
      {"tls-key", "FILE", "PEM client key, for mutual TLS"},
      {"tls-server-name", "NAME",
       "name to verify in the server certificate (default: the host)"},
      {"timeout", "DURATION",
       absl::StrCat("deadline of each call, and the longest wait for one "
                    "batch of a map (default ",
                    absl::FormatDuration(ClientOptions().deadline),
                    "; e.g. 5s, 500ms)")},
      {"help", "", "show help"},
  };
  return *flags;
}

const CommandSpec* FindCommand(absl::string_view name) {
  for (const CommandSpec& c : Commands()) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

void PrintFlags(std::ostream& o, const std::vector<FlagSpec>& flags) {
  for (const FlagSpec& f : flags) {
    std::string left = absl::StrCat(
        "  --", f.name, f.value_name.empty() ? "" : "=", f.value_name);
    o << absl::StrFormat("%-28s %s\n", left, f.help);
  }
}

constexpr char kExitCodesHelp[] =
    "Exit codes:\n"
    "  0  success\n"
    "  1  the server answered with an error (e.g. NOT_FOUND, OUT_OF_RANGE)\n"
    "  2  usage error\n"
    "  3  unavailable: server unreachable, or it answered UNAVAILABLE\n"
    "  4  deadline exceeded (see --timeout)\n"
    "  5  health: not SERVING\n";

void PrintMainHelp(std::ostream& o) {
  o << "Usage: " << kProg << " [GLOBAL FLAGS] COMMAND [ARGS] [FLAGS]\n\n"
    << "Asks a blockmeta server which byte ranges of a disk are data, hole,\n"
       "zero or changed.\n\nCommands:\n";
  for (const CommandSpec& c : Commands()) {
    o << absl::StrFormat("  %-22s %s\n", absl::StrCat(c.name, " ", c.args),
                         c.summary);
  }
  o << "\nGlobal flags (anywhere on the line):\n";
  PrintFlags(o, GlobalFlags());
  o << "\nSizes take binary suffixes (512k, 1G, 1.5GiB).\n"
    << "Run '" << kProg << " COMMAND --help' for a command's flags.\n\n"
    << kExitCodesHelp;
}

void PrintCommandHelp(std::ostream& o, const CommandSpec& c) {
  o << "Usage: " << kProg << " " << c.name << (c.args.empty() ? "" : " ")
    << c.args << (c.flags.empty() ? "" : " [FLAGS]") << "\n\n"
    << absl::StrCat(c.summary, ".") << "\n";
  if (!c.details.empty()) o << c.details << "\n";
  if (!c.flags.empty()) {
    o << "\nFlags:\n";
    PrintFlags(o, c.flags);
  }
  o << "\nGlobal flags:\n";
  PrintFlags(o, GlobalFlags());
  o << "\n" << kExitCodesHelp;
}

int RunHelp(CommandContext& ctx) {
  if (ctx.positional().empty()) {
    PrintMainHelp(ctx.out());
    return kExitOk;
  }
  const CommandSpec* target = FindCommand(ctx.positional()[0]);
  if (target == nullptr) {
    return ctx.Usage(
        absl::StrCat("unknown command ", QuoteBounded(ctx.positional()[0])));
  }
  PrintCommandHelp(ctx.out(), *target);
  return kExitOk;
}

// --- parsing -----------------------------------------------------------------

const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags,
                         absl::string_view name) {
  for (const FlagSpec& f : flags) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

// Parses args[1..]. Returns a usage error message on failure.
std::optional<std::string> Parse(const std::vector<std::string>& args,
                                 Invocation* p) {
  bool only_positional = false;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (!only_positional && a == "--") {
      only_positional = true;
      continue;
    }
    if (!only_positional && (a == "-h" || a == "--help")) {
      p->help = true;
      continue;
    }
    if (!only_positional && absl::StartsWith(a, "--")) {
      std::string name = a.substr(2);
      std::optional<std::string> value;
      if (size_t eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      const FlagSpec* spec = FindFlag(GlobalFlags(), name);
      if (spec == nullptr && p->command != nullptr) {
        spec = FindFlag(p->command->flags, name);
      }
      if (spec == nullptr) {
        if (p->command == nullptr) {
          return absl::StrCat("unknown flag --", name,
                              " (command flags go after the command)");
        }
        return absl::StrCat("unknown flag --", name, " for '", p->command->name,
                            "'");
      }
      if (spec->value_name.empty()) {
        if (value.has_value()) {
          return absl::StrCat("flag --", name, " takes no value");
        }
        value = "";
      } else if (!value.has_value()) {
        if (i + 1 >= args.size()) {
          return absl::StrCat("flag --", name, " needs a value (--", name, "=",
                              spec->value_name, ")");
        }
        value = args[++i];
      }
      if (p->flags.count(name) > 0) {
        return absl::StrCat("flag --", name, " given more than once");
      }
      p->flags[name] = *value;
      continue;
    }
    if (!only_positional && absl::StartsWith(a, "-") && a.size() > 1) {
      return absl::StrCat("unknown flag ", a);
    }
    if (p->command == nullptr) {
      p->command = FindCommand(a);
      if (p->command == nullptr) {
        return absl::StrCat("unknown command ", QuoteBounded(a));
      }
      continue;
    }
    p->positional.push_back(a);
  }
  return std::nullopt;
}

}  // namespace

int RunCli(const std::vector<std::string>& args, const CliEnvironment& env) {
  Invocation parsed;
  std::optional<std::string> error = Parse(args, &parsed);
  if (error.has_value()) {
    std::string where = parsed.command != nullptr
                            ? absl::StrCat(" ", parsed.command->name)
                            : "";
    *env.err << kProg << where << ": " << *error << "\n"
             << "Run '" << kProg << where << " --help' for usage.\n";
    return kExitUsage;
  }
  if (parsed.command == nullptr) {
    if (parsed.help) {
      PrintMainHelp(*env.out);
      return kExitOk;
    }
    *env.err << kProg << ": missing command\n";
    PrintMainHelp(*env.err);
    return kExitUsage;
  }
  if (parsed.help) {
    PrintCommandHelp(*env.out, *parsed.command);
    return kExitOk;
  }
  CommandContext context(env, std::move(parsed));
  int code = context.Run();
  if (env.exit_process) env.exit_process(code);  // the client still lives
  return code;
}

}  // namespace blockmeta::client
