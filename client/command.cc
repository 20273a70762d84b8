// client/command.cc — see command.h.
#include "client/command.h"

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/units.h"
#include "common/quote.h"
#include "google/protobuf/util/json_util.h"

namespace blockmeta::client {

const FlagSpec kOutputBasicFlag{"output", "FORMAT", "human (default) or json"};
const FlagSpec kOffsetFlag{"offset", "SIZE", "start of the range (default 0)"};
const FlagSpec kLengthFlag{"length", "SIZE",
                           "length of the range (default: to the end)"};
const FlagSpec kCacheFlag{
    "cache", "MODE", "use (default), bypass or refresh the server's cache"};

std::string DefaultText(int64_t v) { return absl::StrCat("(default ", v, ")"); }
std::string DefaultText(absl::Duration d) {
  return absl::StrCat("(default ", absl::FormatDuration(d), ")");
}
std::string DefaultSizeText(uint64_t bytes) {
  const char* suffix = "";
  for (const char* s : {"k", "M", "G"}) {
    if (bytes == 0 || bytes % 1024 != 0) break;
    bytes /= 1024;
    suffix = s;
  }
  return absl::StrCat("(default ", bytes, suffix, ")");
}

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

CommandContext::CommandContext(const CliEnvironment& env, Invocation invocation)
    : env_(env), out_(*env.out), err_(*env.err), inv_(std::move(invocation)) {}

std::string CommandContext::Get(const std::string& name,
                                const std::string& def) const {
  auto it = inv_.flags.find(name);
  return it == inv_.flags.end() ? def : it->second;
}

int CommandContext::Run() {
  const CommandSpec& c = command();
  if (!c.connects) return c.run(*this);
  if (static_cast<int>(positional().size()) < c.min_positional) {
    return Usage(absl::StrCat("missing argument ", c.args));
  }
  if (static_cast<int>(positional().size()) > c.max_positional) {
    return Usage(absl::StrCat("unexpected argument ",
                              QuoteBounded(positional()[c.max_positional])));
  }
  for (const std::string& pos : positional()) {
    if (pos.empty()) return Usage("empty argument");
  }
  if (auto e = SetUpClient()) return Usage(*e);
  return c.run(*this);
}

int CommandContext::Usage(absl::string_view message) {
  err_ << kProg << " " << command().name << ": " << message << "\n"
       << "Run '" << kProg << " " << command().name << " --help' for usage.\n";
  return kExitUsage;
}

int CommandContext::Fail(absl::string_view what, const absl::Status& s) {
  err_ << kProg << " " << command().name << ": " << what << ": "
       << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
  if (IsServerUnreachable(s)) {
    err_ << kProg << ": is a blockmeta server running at " << options_.target
         << "? (--server, $BLOCKMETA_SERVER)\n";
  } else if (s.code() == absl::StatusCode::kUnavailable) {
    err_ << kProg << ": the server at " << options_.target
         << " is running and answered UNAVAILABLE: it cannot serve this now "
            "(e.g. the export's upstream is down); retry later\n";
  }
  return ExitCodeForStatus(s);
}

std::optional<std::string> CommandContext::SizeFlag(const std::string& name,
                                                    uint64_t* out) {
  if (!Has(name)) return std::nullopt;
  absl::StatusOr<uint64_t> v = ParseSize(Get(name));
  if (!v.ok()) return absl::StrCat("--", name, ": ", v.status().message());
  *out = *v;
  return std::nullopt;
}

std::optional<std::string> CommandContext::IntFlag(const std::string& name,
                                                   int min, int max, int* out) {
  if (!Has(name)) return std::nullopt;
  int v;
  if (!absl::SimpleAtoi(Get(name), &v) || v < min || v > max) {
    return absl::StrCat("--", name, ": invalid value ", QuoteBounded(Get(name)),
                        " (expected an integer from ", min, " to ", max, ")");
  }
  *out = v;
  return std::nullopt;
}

std::optional<std::string> CommandContext::DurationFlag(const std::string& name,
                                                        absl::Duration* out,
                                                        bool allow_zero) {
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

std::optional<std::string> CommandContext::CacheFlag(v1::CacheMode* mode) {
  if (!Has("cache")) return std::nullopt;
  std::string v = Get("cache");
  if (v == "use") {
    *mode = v1::CACHE_MODE_USE;
  } else if (v == "bypass") {
    *mode = v1::CACHE_MODE_BYPASS;
  } else if (v == "refresh") {
    *mode = v1::CACHE_MODE_REFRESH;
  } else {
    return absl::StrCat("--cache: invalid value ", QuoteBounded(v),
                        " (expected use, bypass or refresh)");
  }
  return std::nullopt;
}

std::optional<std::string> CommandContext::BasicOutput(bool* json) {
  std::string v = Get("output", "human");
  if (v != "human" && v != "json") {
    return absl::StrCat("--output: invalid value ", QuoteBounded(v),
                        " (expected human or json)");
  }
  *json = v == "json";
  return std::nullopt;
}

std::string CommandContext::ProtoJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  std::string s;
  (void)google::protobuf::util::MessageToJsonString(m, &s, o);
  return s;
}

std::optional<std::string> CommandContext::SetUpClient() {
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

}  // namespace blockmeta::client
