// client/cli.cc — see cli.h. One command table (Commands()) holds each
// subcommand's synopsis, flags (so every subcommand has its own --help) and
// the Runner method that runs it; adding a command is one table entry plus
// its method. The bench logic lives in bench.cc; this file parses and
// prints.
#include "client/cli.h"

#include <algorithm>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/bench.h"
#include "client/blockmeta_client.h"
#include "client/du_command.h"
#include "client/export_commands.h"
#include "client/extent_format.h"
#include "client/units.h"
#include "google/protobuf/util/json_util.h"

namespace blockmeta::client {
namespace {

constexpr char kProg[] = "blockmeta";
// map's context when --context is not given.
constexpr char kDefaultContext[] = "base:allocation";

// The help text of a default, from the struct that holds it (so each
// default has one home): "(default 16)", "(default 10s)", "(default 1M)".
std::string Default(int64_t v) { return absl::StrCat("(default ", v, ")"); }
std::string Default(absl::Duration d) {
  return absl::StrCat("(default ", absl::FormatDuration(d), ")");
}
std::string DefaultSize(uint64_t bytes) {
  const char* suffix = "";
  for (const char* s : {"k", "M", "G"}) {
    if (bytes == 0 || bytes % 1024 != 0) break;
    bytes /= 1024;
    suffix = s;
  }
  return absl::StrCat("(default ", bytes, suffix, ")");
}

// --- flag tables -------------------------------------------------------------

struct FlagSpec {
  std::string name;        // Without the leading "--".
  std::string value_name;  // Empty: a boolean flag that takes no value.
  std::string help;
};

class Runner;

struct CommandSpec {
  std::string name;
  std::string args;  // Positional synopsis, e.g. "EXPORT".
  std::string summary;
  std::string details;  // Extra help paragraph; may be empty.
  int min_positional = 0;
  int max_positional = 0;
  std::vector<FlagSpec> flags;
  // Runs the command once its arguments are counted and the client is set
  // up (or, when !connects, straight after parsing).
  int (Runner::*run)() = nullptr;
  bool connects = true;
};

// The command table, in help order (defined after Runner).
const std::vector<CommandSpec>& Commands();

std::vector<FlagSpec> DuFlagSpecs() {
  std::vector<FlagSpec> out;
  for (const DuFlag& f : DuFlagHelp())
    out.push_back({f.name, f.value_name, f.help});
  return out;
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

const FlagSpec kOutputBasic{"output", "FORMAT", "human (default) or json"};
const FlagSpec kOutputMap{"output", "FORMAT",
                          "human (default), json, qemu-json, nbdinfo or csv"};
const FlagSpec kOffset{"offset", "SIZE", "start of the range (default 0)"};
const FlagSpec kLength{"length", "SIZE",
                       "length of the range (default: to the end)"};
const FlagSpec kTotals{"totals", "",
                       "print bytes per type instead of the extents"};
const FlagSpec kCache{"cache", "MODE",
                      "use (default), bypass or refresh the server's cache"};
const FlagSpec kBatch{"batch-size", "N",
                      "extents per streamed message (default: server's)"};
const FlagSpec kProgress{"progress", "WHEN",
                         "progress bar on stderr: auto (default: when stderr "
                         "is a terminal), always or never"};

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

// --- parsing -----------------------------------------------------------------

struct UsageError {
  std::string message;
};

struct Parsed {
  const CommandSpec* command = nullptr;
  std::map<std::string, std::string> flags;  // name -> value ("" for bools)
  std::vector<std::string> positional;
  bool help = false;
};

const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags,
                         absl::string_view name) {
  for (const FlagSpec& f : flags) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

// Parses args[1..]. Returns a usage error message on failure.
std::optional<std::string> Parse(const std::vector<std::string>& args,
                                 Parsed* p) {
  std::vector<std::string> pending;  // Positionals before the command.
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
        return absl::StrCat("unknown command \"", a, "\"");
      }
      continue;
    }
    p->positional.push_back(a);
  }
  return std::nullopt;
}

// --- helpers -----------------------------------------------------------------

class Runner {
 public:
  Runner(const CliEnvironment& env, Parsed parsed)
      : env_(env), out_(*env.out), err_(*env.err), p_(std::move(parsed)) {}

  // Dispatches p_.command through its table entry.
  int Run();

  // The commands, named by Commands(). Each returns the exit code.
  int List();
  int Info();
  int Map() { return MapRange(/*changed=*/false); }
  int Changed() { return MapRange(/*changed=*/true); }
  int Du();
  int Invalidate();
  int Stats();
  int Health();
  int Bench();
  int Export();
  int Help();

 private:
  bool Has(const std::string& name) const { return p_.flags.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& def = "") const {
    auto it = p_.flags.find(name);
    return it == p_.flags.end() ? def : it->second;
  }
  int Usage(const std::string& message) {
    err_ << kProg << " " << p_.command->name << ": " << message << "\n"
         << "Run '" << kProg << " " << p_.command->name
         << " --help' for usage.\n";
    return kExitUsage;
  }
  int Fail(absl::string_view what, const absl::Status& s) {
    err_ << kProg << " " << p_.command->name << ": " << what << ": "
         << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
    if (s.code() == absl::StatusCode::kUnavailable) {
      err_ << kProg << ": is a blockmeta server running at " << options_.target
           << "? (--server, $BLOCKMETA_SERVER)\n";
    }
    return ExitCodeForStatus(s);
  }
  // Parses a size flag into *out; a usage error message on failure.
  std::optional<std::string> SizeFlag(const std::string& name, uint64_t* out) {
    if (!Has(name)) return std::nullopt;
    absl::StatusOr<uint64_t> v = ParseSize(Get(name));
    if (!v.ok()) return absl::StrCat("--", name, ": ", v.status().message());
    *out = *v;
    return std::nullopt;
  }
  std::optional<std::string> IntFlag(const std::string& name, int min, int max,
                                     int* out) {
    if (!Has(name)) return std::nullopt;
    int v;
    if (!absl::SimpleAtoi(Get(name), &v) || v < min || v > max) {
      return absl::StrCat("--", name, ": invalid value \"", Get(name),
                          "\" (expected an integer from ", min, " to ", max,
                          ")");
    }
    *out = v;
    return std::nullopt;
  }
  std::optional<std::string> DurationFlag(const std::string& name,
                                          absl::Duration* out,
                                          bool allow_zero = false) {
    if (!Has(name)) return std::nullopt;
    if (allow_zero && (Get(name) == "0" || Get(name) == "0s")) {
      *out = absl::ZeroDuration();
      return std::nullopt;
    }
    absl::StatusOr<absl::Duration> d = ParseTimeout(Get(name));
    if (!d.ok()) return absl::StrCat("--", name, ": ", d.status().message());
    *out = *d;
    return std::nullopt;
  }
  std::optional<std::string> CacheFlag(v1::CacheMode* mode) {
    if (!Has("cache")) return std::nullopt;
    std::string v = Get("cache");
    if (v == "use") {
      *mode = v1::CACHE_MODE_USE;
    } else if (v == "bypass") {
      *mode = v1::CACHE_MODE_BYPASS;
    } else if (v == "refresh") {
      *mode = v1::CACHE_MODE_REFRESH;
    } else {
      return absl::StrCat("--cache: invalid value \"", v,
                          "\" (expected use, bypass or refresh)");
    }
    return std::nullopt;
  }
  // human/json only.
  std::optional<std::string> BasicOutput(bool* json) {
    std::string v = Get("output", "human");
    if (v != "human" && v != "json") {
      return absl::StrCat("--output: invalid value \"", v,
                          "\" (expected human or json)");
    }
    *json = v == "json";
    return std::nullopt;
  }
  std::optional<std::string> SetUpClient();
  // map and changed: `changed` maps qemu:dirty-bitmap:--bitmap.
  int MapRange(bool changed);

  std::string ProtoJson(const google::protobuf::Message& m) {
    google::protobuf::util::JsonPrintOptions o;
    o.add_whitespace = true;
    o.always_print_primitive_fields = true;
    o.preserve_proto_field_names = true;
    std::string s;
    (void)google::protobuf::util::MessageToJsonString(m, &s, o);
    return s;
  }

  const CliEnvironment& env_;
  std::ostream& out_;
  std::ostream& err_;
  const Parsed p_;
  ClientOptions options_;
  std::unique_ptr<BlockMetaClient> client_;
};

// --- the command table -------------------------------------------------------

const std::vector<CommandSpec>& Commands() {
  static const auto* commands = new std::vector<CommandSpec>{
      {"list",
       "",
       "list the exports the server fronts",
       "",
       0,
       0,
       {kOutputBasic},
       &Runner::List},
      {"info",
       "EXPORT",
       "size, block sizes, capabilities and contexts of an export",
       "",
       1,
       1,
       {kOutputBasic},
       &Runner::Info},
      {"map",
       "EXPORT",
       "map the extents (data, hole, zero) of an export",
       "Formats: human (aligned columns), json (see docs/client.md), "
       "qemu-json (byte-identical to `qemu-img map --output=json`), nbdinfo "
       "(identical to `nbdinfo --map`), csv.",
       1,
       1,
       {{"context", "NAME[,NAME...]",
         absl::StrCat("metadata context (default ", kDefaultContext,
                      "), e.g. qemu:dirty-bitmap:NAME; several, "
                      "comma-separated, are shown side by side (human, json)")},
        kOffset,
        kLength,
        kTotals,
        kOutputMap,
        kCache,
        kBatch,
        kProgress},
       &Runner::Map},
      {"changed",
       "EXPORT",
       "map the blocks changed since a dirty bitmap (checkpoint) was made",
       "Maps the context qemu:dirty-bitmap:NAME. The human format lists only "
       "the dirty ranges, with a ZERO column (the block reads as zeroes: "
       "write zeroes, do not copy); json carries dirty and zero per extent, "
       "like imageio's dirty extents (both ask base:allocation in the same "
       "query); nbdinfo is identical to `nbdinfo "
       "--map=qemu:dirty-bitmap:NAME`.",
       1,
       1,
       {{"bitmap", "NAME", "the dirty bitmap (required)"},
        kOffset,
        kLength,
        kTotals,
        {"output", "FORMAT", "human (default), json, nbdinfo or csv"},
        kCache,
        kBatch,
        kProgress},
       &Runner::Changed},
      {"du", "EXPORT", kDuSummary, kDuDetails, 1, 1, DuFlagSpecs(),
       &Runner::Du},
      {"invalidate",
       "[EXPORT]",
       "drop cached extents (of one export, or of all)",
       "Use it after writing to a disk through a path blockmeta cannot see.",
       0,
       1,
       {{"context", "NAME", "only this context (default: all)"},
        kOffset,
        {"length", "SIZE", "length of the range (default: to the end)"},
        kOutputBasic},
       &Runner::Invalidate},
      {"stats",
       "[EXPORT]",
       "cache and upstream counters",
       "",
       0,
       1,
       {kOutputBasic},
       &Runner::Stats},
      {"health",
       "[SERVICE]",
       "grpc.health.v1 check of the server (or of SERVICE)",
       "Prints SERVING or NOT_SERVING; exits 5 when not serving.",
       0,
       1,
       {},
       &Runner::Health},
      {"bench",
       "",
       "load generator: GetExtents or health calls at a concurrency",
       "--rpc=compare alternates an empty-RPC baseline (health Check) with "
       "GetExtents on the same server and prints the QPS ratio. Before "
       "measuring GetExtents it maps the range once so calls hit the cache "
       "(--no-warm skips that).",
       0,
       0,
       {{"rpc", "KIND", "extents (default), health or compare"},
        {"export", "NAME", "export for GetExtents"},
        {"context", "NAME",
         absl::StrCat("metadata context (default ", kDefaultContext, ")")},
        {"concurrency", "N",
         absl::StrCat("calls in flight ", Default(BenchOptions().concurrency))},
        {"threads", "N",
         absl::StrCat("client threads ", Default(BenchOptions().threads))},
        {"channels", "N",
         absl::StrCat("TCP connections ", Default(BenchOptions().channels))},
        {"duration", "DURATION",
         absl::StrCat("measured time per run ",
                      Default(BenchOptions().duration))},
        {"warmup", "DURATION",
         absl::StrCat("unmeasured time before it ",
                      Default(BenchOptions().warmup))},
        {"rounds", "N",
         absl::StrCat("compare: baseline/extents pairs ",
                      Default(BenchPlan().rounds))},
        {"pattern", "KIND", "fixed (default) or random offsets"},
        {"offset", "SIZE", "request offset, or start of the random range"},
        {"length", "SIZE",
         absl::StrCat("request length ", DefaultSize(BenchOptions().length))},
        {"range", "SIZE", "random: size of the range (default: to the end)"},
        {"align", "SIZE",
         absl::StrCat("random: offset alignment ",
                      DefaultSize(BenchOptions().align))},
        {"max-extents", "N", "GetExtents max_extents (default: server's)"},
        kCache,
        {"no-warm", "", "do not map the range before measuring"},
        {"service", "NAME", "health: service to check (default \"\")"},
        {"output", "FORMAT", "human (default) or json"}},
       &Runner::Bench},
      {"export",
       "add|remove|list [NAME]",
       "add or remove an export of a running server (Admin API)",
       "Admin calls are served only over the server's gRPC Unix socket "
       "(--server=unix:PATH) or to an mTLS identity in admin_identities. "
       "add waits until the upstream is READY; adding the same config again "
       "is OK, another config for the name is ALREADY_EXISTS. remove ends "
       "the export's streams and NBD sessions and frees its cache.",
       1,
       2,
       {{"uri", "URI", "add: an NBD URI upstream"},
        {"image", "PATH", "add: a raw/qcow2 image served by qemu-nbd"},
        {"format", "FMT", "add --image: raw or qcow2 (default: by name)"},
        {"bitmap", "B[,B...]", "add --image: qcow2 dirty bitmaps to export"},
        {"image-read-only", "", "add --image: qemu-nbd --read-only"},
        {"command", "ARGV",
         "add: an NBD server command, e.g. \"nbdkit "
         "memory 1G\""},
        {"description", "TEXT", "add: description"},
        {"read-only", "", "add: refuse writes through the NBD shim"},
        {"connections", "N", "add: upstream connections"},
        {"upstream-timeout-ms", "N", "add: timeout of one upstream call"},
        {"cache-ttl-seconds", "N", "add: cache TTL override"},
        kOutputBasic},
       &Runner::Export},
      {"help",
       "[COMMAND]",
       "show help for blockmeta or a command",
       "",
       0,
       1,
       {},
       &Runner::Help,
       /*connects=*/false},
  };
  return *commands;
}

int Runner::Export() {
  bool json;
  if (auto e = BasicOutput(&json)) return Usage(*e);
  const std::string& verb = p_.positional[0];
  if (verb == "list") {
    if (p_.positional.size() != 1) return Usage("export list takes no NAME");
    absl::StatusOr<v1::AdminListExportsResponse> r =
        client_->AdminListExports();
    if (!r.ok()) return Fail("ListExports", r.status());
    if (json) {
      out_ << ProtoJson(*r);
    } else {
      for (const v1::AdminExport& e : r->exports()) PrintAdminExport(out_, e);
    }
    return kExitOk;
  }
  if (p_.positional.size() != 2) {
    return Usage(absl::StrCat("export ", verb, " needs NAME"));
  }
  const std::string& name = p_.positional[1];
  if (verb == "add") {
    v1::AddExportRequest req;
    if (auto e = ExportConfigFromFlags(name, p_.flags, req.mutable_config())) {
      return Usage(*e);
    }
    absl::StatusOr<v1::AddExportResponse> r = client_->AddExport(req);
    if (!r.ok()) return Fail("AddExport", r.status());
    if (json) {
      out_ << ProtoJson(*r);
    } else {
      out_ << (r->created() ? "added " : "already present ");
      PrintAdminExport(out_, r->export_info());
    }
    return kExitOk;
  }
  if (verb == "remove") {
    absl::StatusOr<v1::RemoveExportResponse> r = client_->RemoveExport(name);
    if (!r.ok()) return Fail("RemoveExport", r.status());
    if (json) {
      out_ << ProtoJson(*r);
    } else {
      out_ << "removed " << name << " generation=" << r->generation() << "\n";
    }
    return kExitOk;
  }
  return Usage(absl::StrCat("unknown export action \"", verb,
                            "\" (expected add, remove or list)"));
}

std::optional<std::string> Runner::SetUpClient() {
  options_.target =
      Get("server", env_.default_server.empty() ? ClientOptions().target
                                                : env_.default_server);
  options_.tls.enabled = Has("tls") || Has("tls-ca") || Has("tls-cert") ||
                         Has("tls-key") || Has("tls-server-name");
  options_.tls.ca_file = Get("tls-ca");
  options_.tls.cert_file = Get("tls-cert");
  options_.tls.key_file = Get("tls-key");
  options_.tls.server_name = Get("tls-server-name");
  for (const char* f :
       {"server", "tls-ca", "tls-cert", "tls-key", "tls-server-name"}) {
    if (Has(f) && Get(f).empty()) {
      return absl::StrCat("--", f, " needs a non-empty value");
    }
  }
  if (auto e = DurationFlag("timeout", &options_.deadline)) return e;
  absl::StatusOr<std::unique_ptr<BlockMetaClient>> c =
      BlockMetaClient::Connect(options_);
  if (!c.ok()) return std::string(c.status().message());
  client_ = *std::move(c);
  return std::nullopt;
}

// Progress bar on stderr: "[#####.....]  45%  1.2 GiB of 2.0 GiB", redrawn
// at most 10 times a second, erased when done.
class ProgressBar {
 public:
  ProgressBar(std::ostream* err, bool enabled) : err_(*err), on_(enabled) {}
  ~ProgressBar() { Clear(); }

  void Update(uint64_t start, uint64_t pos, uint64_t end) {
    if (!on_ || end <= start) return;
    absl::Time now = absl::Now();
    if (drawn_ && now - last_ < absl::Milliseconds(100) && pos < end) return;
    last_ = now;
    double frac =
        static_cast<double>(pos - start) / static_cast<double>(end - start);
    int filled = static_cast<int>(frac * 30);
    err_ << "\r[" << std::string(filled, '#') << std::string(30 - filled, '.')
         << "] " << absl::StrFormat("%3d%%", static_cast<int>(frac * 100))
         << "  " << FormatSize(pos - start) << " of " << FormatSize(end - start)
         << "\033[K" << std::flush;
    drawn_ = true;
  }
  void Clear() {
    if (drawn_) err_ << "\r\033[K" << std::flush;
    drawn_ = false;
  }

 private:
  std::ostream& err_;
  const bool on_;
  bool drawn_ = false;
  absl::Time last_;
};

// --- commands ----------------------------------------------------------------

int Runner::Run() {
  const CommandSpec& c = *p_.command;
  if (p_.help) {
    PrintCommandHelp(out_, c);
    return kExitOk;
  }
  if (!c.connects) return (this->*c.run)();
  if (static_cast<int>(p_.positional.size()) < c.min_positional) {
    return Usage(absl::StrCat("missing argument ", c.args));
  }
  if (static_cast<int>(p_.positional.size()) > c.max_positional) {
    return Usage(absl::StrCat("unexpected argument \"",
                              p_.positional[c.max_positional], "\""));
  }
  for (const std::string& pos : p_.positional) {
    if (pos.empty()) return Usage("empty argument");
  }
  if (auto e = SetUpClient()) return Usage(*e);
  return (this->*c.run)();
}

int Runner::Help() {
  if (p_.positional.empty()) {
    PrintMainHelp(out_);
    return kExitOk;
  }
  const CommandSpec* target = FindCommand(p_.positional[0]);
  if (target == nullptr) {
    return Usage(absl::StrCat("unknown command \"", p_.positional[0], "\""));
  }
  PrintCommandHelp(out_, *target);
  return kExitOk;
}

const char* StateName(v1::ExportState s) {
  switch (s) {
    case v1::EXPORT_STATE_READY:
      return "READY";
    case v1::EXPORT_STATE_UNAVAILABLE:
      return "UNAVAILABLE";
    default:
      return "UNKNOWN";
  }
}

int Runner::List() {
  bool json;
  if (auto e = BasicOutput(&json)) return Usage(*e);
  absl::StatusOr<v1::ListExportsResponse> r = client_->ListExports();
  if (!r.ok()) return Fail("ListExports", r.status());
  if (json) {
    out_ << ProtoJson(*r);
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "STATE", "SIZE", "DESCRIPTION"}};
  for (const v1::ExportSummary& e : r->exports()) {
    rows.push_back({e.name(), StateName(e.state()), FormatSize(e.size()),
                    e.description()});
  }
  std::vector<size_t> width(3, 0);
  for (const auto& row : rows) {
    for (size_t i = 0; i < 3; ++i) width[i] = std::max(width[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line =
        absl::StrFormat("%-*s  %-*s  %*s  %s", width[0], row[0], width[1],
                        row[1], width[2], row[2], row[3]);
    line.erase(line.find_last_not_of(' ') + 1);
    out_ << line << "\n";
  }
  return kExitOk;
}

int Runner::Info() {
  bool json;
  if (auto e = BasicOutput(&json)) return Usage(*e);
  absl::StatusOr<v1::ExportInfo> r = client_->GetExportInfo(p_.positional[0]);
  if (!r.ok()) return Fail("GetExportInfo", r.status());
  if (json) {
    out_ << ProtoJson(*r);
    return kExitOk;
  }
  std::vector<std::string> caps;
  if (r->can_trim()) caps.push_back("trim");
  if (r->can_zero()) caps.push_back("zero");
  if (r->can_flush()) caps.push_back("flush");
  if (r->can_fua()) caps.push_back("fua");
  if (r->can_multi_conn()) caps.push_back("multi-conn");
  if (r->can_cache()) caps.push_back("cache");
  auto line = [&](absl::string_view k, absl::string_view v) {
    out_ << absl::StrFormat("%-12s %s\n", absl::StrCat(k, ":"), v);
  };
  line("name", r->name());
  if (!r->description().empty()) line("description", r->description());
  line("state", StateName(r->state()));
  line("size", absl::StrCat(FormatSize(r->size()), " (", r->size(), " bytes)"));
  line("block size", absl::StrCat("minimum ", r->minimum_block_size(),
                                  ", preferred ", r->preferred_block_size(),
                                  ", maximum ", r->maximum_block_size()));
  line("read-only", r->read_only() ? "yes" : "no");
  line("can", caps.empty() ? "-" : absl::StrJoin(caps, " "));
  line("contexts", absl::StrJoin(r->metadata_contexts(), ", "));
  if (!r->upstream().empty()) line("upstream", r->upstream());
  if (!r->last_error().empty()) line("last error", r->last_error());
  return kExitOk;
}

int Runner::MapRange(bool changed) {
  v1::MapExtentsRequest req;
  req.set_export_name(p_.positional[0]);
  req.set_coalesce(true);
  if (changed) {
    if (!Has("bitmap")) return Usage("missing --bitmap=NAME");
    if (Get("bitmap").empty()) return Usage("--bitmap needs a name");
    req.set_context(absl::StrCat("qemu:dirty-bitmap:", Get("bitmap")));
  } else {
    if (Has("context") && Get("context").empty()) {
      return Usage("--context needs a name");
    }
    std::vector<std::string> contexts =
        absl::StrSplit(Get("context", kDefaultContext), ',');
    if (contexts.size() > 1) {
      for (const std::string& c : contexts) {
        if (c.empty()) return Usage("--context: an empty name in the list");
        req.add_contexts(c);
      }
    } else {
      req.set_context(contexts[0]);
    }
  }
  uint64_t offset = 0, length = 0;
  if (auto e = SizeFlag("offset", &offset)) return Usage(*e);
  if (auto e = SizeFlag("length", &length)) return Usage(*e);
  if (Has("length") && length == 0) {
    return Usage("--length must be > 0 (omit it to map to the end)");
  }
  req.set_offset(offset);
  req.set_length(length);
  v1::CacheMode mode = v1::CACHE_MODE_USE;
  if (auto e = CacheFlag(&mode)) return Usage(*e);
  req.set_cache_mode(mode);
  int batch = 0;
  if (auto e = IntFlag("batch-size", 1, 65536, &batch)) return Usage(*e);
  req.set_batch_size(batch);
  std::string progress = Get("progress", "auto");
  if (progress != "auto" && progress != "always" && progress != "never") {
    return Usage(absl::StrCat("--progress: invalid value \"", progress,
                              "\" (expected auto, always or never)"));
  }
  WriterOptions wo;
  absl::StatusOr<OutputFormat> fmt = ParseOutputFormat(Get("output", "human"));
  if (!fmt.ok())
    return Usage(absl::StrCat("--output: ", fmt.status().message()));
  wo.format = *fmt;
  wo.totals = Has("totals");
  wo.dirty_only = changed;
  const bool side_by_side =
      wo.format == OutputFormat::kHuman || wo.format == OutputFormat::kJson;
  if (req.contexts_size() > 0 && (!side_by_side || wo.totals)) {
    return Usage(
        "several contexts side by side need --output=human or json (without "
        "--totals)");
  }
  if (changed && side_by_side && !wo.totals) {
    // The zero information in the same query: whether each changed block
    // reads as zeroes (the bitmap first, so TYPE stays the bitmap's).
    req.add_contexts(req.context());
    req.add_contexts(std::string(kDefaultContext));
    req.clear_context();
  }
  if (wo.format == OutputFormat::kQemuJson &&
      req.context() != "base:allocation") {
    return Usage(
        "--output=qemu-json describes base:allocation only (qemu-img map "
        "cannot show other contexts)");
  }
  absl::StatusOr<std::unique_ptr<ExtentWriter>> writer =
      MakeExtentWriter(wo, &out_);
  if (!writer.ok()) return Usage(std::string(writer.status().message()));

  ProgressBar bar(
      &err_, progress == "always" || (progress == "auto" && env_.err_is_tty));
  std::unique_ptr<ExtentIterator> it = client_->MapExtents(req);
  bool begun = false;
  v1::Extent e;
  while (true) {
    absl::StatusOr<bool> more = it->Next(&e);
    if (!more.ok()) {
      bar.Clear();
      out_.flush();
      return Fail("MapExtents", more.status());
    }
    if (!begun) {  // also for an empty export: headers, "[]", totals
      MapHeader h;
      h.export_name = req.export_name();
      h.context = it->context().empty() ? req.context() : it->context();
      h.contexts.assign(req.contexts().begin(), req.contexts().end());
      if (h.context.empty() && !h.contexts.empty()) h.context = h.contexts[0];
      h.offset = offset;
      h.end = it->range_end();
      h.export_size = it->export_size();
      (*writer)->Begin(h);
      begun = true;
    }
    if (!*more) break;
    (*writer)->Add(e);
    bar.Update(offset, it->position(), it->range_end());
  }
  bar.Clear();
  (*writer)->End();
  out_.flush();
  return kExitOk;
}

int Runner::Du() {
  v1::GetTotalsRequest req;
  DuOutput output;
  if (auto e = DuRequestFromFlags(p_.positional[0], p_.flags, &req, &output)) {
    return Usage(*e);
  }
  absl::StatusOr<v1::GetTotalsResponse> r = client_->GetTotals(req);
  if (!r.ok()) return Fail("GetTotals", r.status());
  PrintDu(*r, output, out_);
  return kExitOk;
}

int Runner::Invalidate() {
  bool json;
  if (auto e = BasicOutput(&json)) return Usage(*e);
  v1::InvalidateCacheRequest req;
  if (!p_.positional.empty()) req.set_export_name(p_.positional[0]);
  if (Has("context") && Get("context").empty()) {
    return Usage("--context needs a name");
  }
  req.set_context(Get("context"));
  uint64_t offset = 0, length = 0;
  if (auto e = SizeFlag("offset", &offset)) return Usage(*e);
  if (auto e = SizeFlag("length", &length)) return Usage(*e);
  if (Has("length") && length == 0) {
    return Usage("--length must be > 0 (omit it to invalidate to the end)");
  }
  req.set_offset(offset);
  req.set_length(length);
  absl::StatusOr<v1::InvalidateCacheResponse> r = client_->InvalidateCache(req);
  if (!r.ok()) return Fail("InvalidateCache", r.status());
  if (json) {
    out_ << ProtoJson(*r);
    return kExitOk;
  }
  out_ << "dropped " << r->extents_dropped() << " cached extent"
       << (r->extents_dropped() == 1 ? "" : "s") << " covering "
       << FormatSize(r->bytes_dropped()) << " (" << r->bytes_dropped()
       << " bytes)\n";
  return kExitOk;
}

int Runner::Stats() {
  bool json;
  if (auto e = BasicOutput(&json)) return Usage(*e);
  absl::StatusOr<v1::GetStatsResponse> r =
      client_->GetStats(p_.positional.empty() ? "" : p_.positional[0]);
  if (!r.ok()) return Fail("GetStats", r.status());
  if (json) {
    out_ << ProtoJson(*r);
    return kExitOk;
  }
  out_ << "cache memory " << FormatSize(r->total().memory_bytes()) << " of "
       << FormatSize(r->memory_limit_bytes()) << ", " << r->total().entries()
       << " extents held\n";
  std::vector<std::vector<std::string>> rows = {
      {"EXPORT", "CONTEXT", "HITS", "PARTIAL", "MISSES", "UPSTREAM",
       "COALESCED", "FROM CACHE", "EVICTIONS", "INVALIDATIONS", "ENTRIES",
       "MEMORY"}};
  auto add = [&](const std::string& name, const std::string& ctx,
                 const v1::CacheCounters& c) {
    rows.push_back(
        {name, ctx, absl::StrCat(c.hits()), absl::StrCat(c.partial_hits()),
         absl::StrCat(c.misses()), absl::StrCat(c.upstream_calls()),
         absl::StrCat(c.coalesced_waits()), FormatSize(c.bytes_from_cache()),
         absl::StrCat(c.evictions()), absl::StrCat(c.invalidations()),
         absl::StrCat(c.entries()), FormatSize(c.memory_bytes())});
  };
  add("(total)", "", r->total());
  for (const v1::ExportStats& e : r->exports()) {
    std::map<std::string, v1::CacheCounters> sorted(e.contexts().begin(),
                                                    e.contexts().end());
    for (const auto& [ctx, c] : sorted) add(e.export_name(), ctx, c);
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      width[i] = std::max(width[i], row[i].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      if (i < 2) {
        absl::StrAppend(&line, absl::StrFormat("%-*s  ", width[i], row[i]));
      } else {
        absl::StrAppend(&line, absl::StrFormat("%*s  ", width[i], row[i]));
      }
    }
    line.erase(line.find_last_not_of(' ') + 1);
    out_ << line << "\n";
  }
  if (!r->exports().empty()) {
    out_ << "\n";
    for (const v1::ExportStats& e : r->exports()) {
      out_ << e.export_name() << ": upstream calls " << e.upstream_calls()
           << ", errors " << e.upstream_errors() << ", reconnects "
           << e.reconnects() << "\n";
    }
  }
  return kExitOk;
}

int Runner::Health() {
  std::string service = p_.positional.empty() ? "" : p_.positional[0];
  absl::StatusOr<ServingStatus> r = client_->Health(service);
  if (!r.ok()) return Fail("health check", r.status());
  out_ << ServingStatusName(*r) << "\n";
  return *r == ServingStatus::kServing ? kExitOk : kExitNotServing;
}

int Runner::Bench() {
  BenchPlan plan;
  BenchOptions& o = plan.load;
  o.client = options_;
  std::string rpc = Get("rpc", "extents");
  if (rpc == "extents") {
    plan.mode = BenchMode::kExtents;
  } else if (rpc == "health") {
    plan.mode = BenchMode::kHealth;
  } else if (rpc == "compare") {
    plan.mode = BenchMode::kCompare;
  } else {
    return Usage(absl::StrCat("--rpc: invalid value \"", rpc,
                              "\" (expected extents, health or compare)"));
  }
  bool json;
  if (auto e = BasicOutput(&json)) return Usage(*e);
  o.export_name = Get("export");
  if (plan.mode != BenchMode::kHealth && o.export_name.empty()) {
    return Usage(absl::StrCat("--rpc=", rpc, " needs --export=NAME"));
  }
  o.context = Get("context");
  o.health_service = Get("service");
  if (auto e = IntFlag("concurrency", 1, 100000, &o.concurrency)) {
    return Usage(*e);
  }
  if (auto e = IntFlag("threads", 1, 256, &o.threads)) return Usage(*e);
  if (auto e = IntFlag("channels", 1, 256, &o.channels)) return Usage(*e);
  if (o.threads > o.concurrency) {
    return Usage("--threads must not exceed --concurrency");
  }
  if (o.channels > o.threads) {
    return Usage("--channels must not exceed --threads");
  }
  if (auto e = DurationFlag("duration", &o.duration)) return Usage(*e);
  if (auto e = DurationFlag("warmup", &o.warmup, /*allow_zero=*/true)) {
    return Usage(*e);
  }
  if (auto e = IntFlag("rounds", 1, 1000, &plan.rounds)) return Usage(*e);
  std::string pattern = Get("pattern", "fixed");
  if (pattern == "fixed") {
    o.pattern = BenchPattern::kFixed;
  } else if (pattern == "random") {
    o.pattern = BenchPattern::kRandom;
  } else {
    return Usage(absl::StrCat("--pattern: invalid value \"", pattern,
                              "\" (expected fixed or random)"));
  }
  if (auto e = SizeFlag("offset", &o.offset)) return Usage(*e);
  if (auto e = SizeFlag("length", &o.length)) return Usage(*e);
  if (auto e = SizeFlag("range", &o.range)) return Usage(*e);
  if (auto e = SizeFlag("align", &o.align)) return Usage(*e);
  if (o.length == 0) return Usage("--length must be > 0");
  if (o.align == 0) return Usage("--align must be > 0");
  int max_extents = 0;
  if (auto e = IntFlag("max-extents", 0, 65536, &max_extents)) {
    return Usage(*e);
  }
  o.max_extents = static_cast<uint32_t>(max_extents);
  if (auto e = CacheFlag(&o.cache_mode)) return Usage(*e);
  plan.warm = !Has("no-warm");

  std::string failed_step;
  absl::StatusOr<BenchReport> r = RunBenchPlan(
      plan, client_.get(),
      [&](const BenchResult& run) {
        if (json) return;  // One JSON document at the end.
        out_ << FormatBenchResult(run);
        out_.flush();
      },
      &err_, &failed_step);
  if (!r.ok()) return Fail(failed_step, r.status());
  out_ << (json ? BenchReportJson(*r) : FormatBenchSummary(*r));
  return r->all_ok ? kExitOk : kExitRpcError;
}

}  // namespace

int ExitCodeForStatus(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return kExitOk;
    case absl::StatusCode::kUnavailable:
      return kExitUnavailable;
    case absl::StatusCode::kDeadlineExceeded:
      return kExitDeadline;
    default:
      return kExitRpcError;
  }
}

int RunCli(const std::vector<std::string>& args, const CliEnvironment& env) {
  Parsed parsed;
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
  Runner runner(env, std::move(parsed));
  return runner.Run();
}

}  // namespace blockmeta::client
