// client/du_command.cc — see du_command.h.
#include "client/du_command.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/extent_format.h"
#include "client/units.h"

namespace blockmeta::client {
namespace {

namespace v1 = ::blockmeta::v1;

constexpr char kAllocation[] = "base:allocation";
constexpr char kBitmapPrefix[] = "qemu:dirty-bitmap:";

std::string Percent(uint64_t part, uint64_t whole) {
  if (whole == 0) return "0.0%";
  return absl::StrFormat(
      "%.1f%%", 100.0 * static_cast<double>(part) / static_cast<double>(whole));
}

std::string OutcomeName(v1::CacheOutcome o) {
  const std::string& full = v1::CacheOutcome_Name(o);
  absl::string_view name = full;
  absl::ConsumePrefix(&name, "CACHE_OUTCOME_");
  return std::string(name);
}

// One human line: name, bytes, size, share of the range, what it means.
void Line(std::ostream& out, absl::string_view name, uint64_t bytes,
          uint64_t whole, absl::string_view meaning) {
  std::string line =
      absl::StrFormat("  %-14s %16u  %10s  %6s  %s", name, bytes,
                      FormatSize(bytes), Percent(bytes, whole), meaning);
  line.erase(line.find_last_not_of(' ') + 1);
  out << line << "\n";
}

void PrintHuman(const v1::GetTotalsResponse& r, std::ostream& out) {
  const uint64_t whole = r.length();
  out << "export " << r.export_name() << ", range " << r.offset() << "-"
      << r.offset() + r.length() << " (" << FormatSize(whole) << " of "
      << FormatSize(r.export_size()) << "), " << r.extents() << " extent"
      << (r.extents() == 1 ? "" : "s") << ", cache "
      << OutcomeName(r.cache_outcome()) << "\n";
  for (const v1::ContextTotals& t : r.contexts()) {
    out << t.context() << " (" << t.extents() << " extent"
        << (t.extents() == 1 ? "" : "s") << ")\n";
    if (t.context() == kAllocation) {
      Line(out, "data", t.data(), whole, "allocated");
      Line(out, "hole", t.hole(), whole, "not allocated");
      Line(out, "zero", t.zero(), whole, "reads as zeroes");
      Line(out, "nonzero", t.nonzero(), whole, "a full backup reads these");
    } else if (absl::StartsWith(t.context(), kBitmapPrefix)) {
      Line(out, "dirty", t.dirty(), whole, "changed since the checkpoint");
      Line(out, "clean", t.clean(), whole, "");
      if (t.has_dirty_data()) {
        Line(out, "dirty data", t.dirty_data(), whole, "changed and allocated");
      }
      if (t.has_dirty_nonzero()) {
        Line(out, "dirty nonzero", t.dirty_nonzero(), whole,
             "an incremental backup reads these");
      }
    } else {
      for (const v1::FlagsTotal& f : t.by_flags()) {
        Line(out, absl::StrCat("flags ", f.flags()), f.bytes(), whole, "");
      }
      if (t.by_flags_truncated()) out << "  (more flag values not shown)\n";
    }
  }
}

void PrintJson(const v1::GetTotalsResponse& r, std::ostream& out) {
  std::vector<std::string> contexts;
  for (const v1::ContextTotals& t : r.contexts()) {
    std::string c = absl::StrCat("{\"context\": ", JsonQuote(t.context()),
                                 ", \"extents\": ", t.extents());
    if (t.context() == kAllocation) {
      absl::StrAppend(&c, ", \"data\": ", t.data(), ", \"hole\": ", t.hole(),
                      ", \"zero\": ", t.zero(), ", \"nonzero\": ", t.nonzero());
    } else if (absl::StartsWith(t.context(), kBitmapPrefix)) {
      absl::StrAppend(&c, ", \"dirty\": ", t.dirty(),
                      ", \"clean\": ", t.clean());
      if (t.has_dirty_data()) {
        absl::StrAppend(&c, ", \"dirty_data\": ", t.dirty_data());
      }
      if (t.has_dirty_nonzero()) {
        absl::StrAppend(&c, ", \"dirty_nonzero\": ", t.dirty_nonzero());
      }
    }
    std::vector<std::string> flags;
    for (const v1::FlagsTotal& f : t.by_flags()) {
      flags.push_back(absl::StrCat("{\"flags\": ", f.flags(),
                                   ", \"bytes\": ", f.bytes(), "}"));
    }
    absl::StrAppend(&c, ", \"by_flags\": [", absl::StrJoin(flags, ", "),
                    "], \"by_flags_truncated\": ",
                    t.by_flags_truncated() ? "true" : "false", "}");
    contexts.push_back(std::move(c));
  }
  out << "{\"export\": " << JsonQuote(r.export_name())
      << ", \"export_size\": " << r.export_size()
      << ", \"offset\": " << r.offset() << ", \"length\": " << r.length()
      << ", \"extents\": " << r.extents()
      << ", \"cache_outcome\": " << JsonQuote(OutcomeName(r.cache_outcome()))
      << ",\n \"contexts\": [\n  " << absl::StrJoin(contexts, ",\n  ")
      << "\n]}\n";
}

}  // namespace

const char kDuSummary[] =
    "bytes that are data, hole, zero or changed, without streaming the map";
const char kDuDetails[] =
    "One GetTotals call: the server walks the range as a map would (from "
    "its cache, asking the upstream for what it does not know, which it "
    "then keeps) and returns only the sums. base:allocation is always "
    "totalled; with --context=qemu:dirty-bitmap:NAME the bitmap's dirty "
    "bytes are also split into data and nonzero (what an incremental "
    "backup reads). A cold multi-TiB disk may need a longer --timeout.";

const std::vector<FlagSpec>& DuFlagHelp() {
  static const auto* flags = new std::vector<FlagSpec>{
      {"context", "NAME[,NAME...]",
       "also total these contexts, e.g. qemu:dirty-bitmap:NAME (at most 7)"},
      {"offset", "SIZE", "start of the range (default 0)"},
      {"length", "SIZE", "length of the range (default: to the end)"},
      {"cache", "MODE", "use (default), bypass or refresh the server's cache"},
      {"output", "FORMAT", "human (default; also 'text') or json"},
  };
  return *flags;
}

std::optional<std::string> DuRequestFromFlags(
    const std::string& export_name,
    const std::map<std::string, std::string>& flags,
    v1::GetTotalsRequest* request, DuOutput* output) {
  auto get = [&](const std::string& name) -> const std::string* {
    auto it = flags.find(name);
    return it == flags.end() ? nullptr : &it->second;
  };
  request->set_export_name(export_name);
  request->add_contexts(kAllocation);
  if (const std::string* c = get("context")) {
    if (c->empty()) return std::string("--context needs a name");
    for (absl::string_view name : absl::StrSplit(*c, ',')) {
      if (name.empty()) return std::string("--context: an empty name");
      if (name == kAllocation) continue;  // always totalled
      for (const std::string& seen : request->contexts()) {
        if (seen == name) {
          return absl::StrCat("--context: \"", name.substr(0, 256),
                              "\" given twice");
        }
      }
      request->add_contexts(std::string(name));
    }
  }
  for (const char* name : {"offset", "length"}) {
    const std::string* v = get(name);
    if (v == nullptr) continue;
    absl::StatusOr<uint64_t> n = ParseSize(*v);
    if (!n.ok()) return absl::StrCat("--", name, ": ", n.status().message());
    if (std::string(name) == "offset") {
      request->set_offset(*n);
    } else {
      if (*n == 0) {
        return std::string(
            "--length must be > 0 (omit it to total to the end)");
      }
      request->set_length(*n);
    }
  }
  if (const std::string* m = get("cache")) {
    if (*m == "use") {
      request->set_cache_mode(v1::CACHE_MODE_USE);
    } else if (*m == "bypass") {
      request->set_cache_mode(v1::CACHE_MODE_BYPASS);
    } else if (*m == "refresh") {
      request->set_cache_mode(v1::CACHE_MODE_REFRESH);
    } else {
      return absl::StrCat("--cache: invalid value \"", m->substr(0, 64),
                          "\" (expected use, bypass or refresh)");
    }
  }
  *output = DuOutput::kHuman;
  if (const std::string* o = get("output")) {
    if (*o == "json") {
      *output = DuOutput::kJson;
    } else if (*o != "human" && *o != "text") {
      return absl::StrCat("--output: invalid value \"", o->substr(0, 64),
                          "\" (expected human, text or json)");
    }
  }
  return std::nullopt;
}

void PrintDu(const v1::GetTotalsResponse& response, DuOutput output,
             std::ostream& out) {
  if (output == DuOutput::kJson) {
    PrintJson(response, out);
  } else {
    PrintHuman(response, out);
  }
}

namespace {

int RunDu(CommandContext& ctx) {
  v1::GetTotalsRequest req;
  DuOutput output;
  if (auto e =
          DuRequestFromFlags(ctx.positional()[0], ctx.flags(), &req, &output)) {
    return ctx.Usage(*e);
  }
  absl::StatusOr<v1::GetTotalsResponse> r = ctx.client().GetTotals(req);
  if (!r.ok()) return ctx.Fail("GetTotals", r.status());
  PrintDu(*r, output, ctx.out());
  return kExitOk;
}

}  // namespace

CommandSpec DuCommand() {
  return {"du", "EXPORT", kDuSummary, kDuDetails, 1, 1, DuFlagHelp(), &RunDu};
}

}  // namespace blockmeta::client
