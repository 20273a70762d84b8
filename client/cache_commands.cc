// client/cache_commands.cc — see cache_commands.h.
#include "client/cache_commands.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/units.h"

namespace blockmeta::client {
namespace {

int RunInvalidate(CommandContext& ctx) {
  bool json;
  if (auto e = ctx.BasicOutput(&json)) return ctx.Usage(*e);
  v1::InvalidateCacheRequest req;
  if (!ctx.positional().empty()) req.set_export_name(ctx.positional()[0]);
  if (ctx.Has("context") && ctx.Get("context").empty()) {
    return ctx.Usage("--context needs a name");
  }
  req.set_context(ctx.Get("context"));
  uint64_t offset = 0, length = 0;
  if (auto e = ctx.SizeFlag("offset", &offset)) return ctx.Usage(*e);
  if (auto e = ctx.SizeFlag("length", &length)) return ctx.Usage(*e);
  if (ctx.Has("length") && length == 0) {
    return ctx.Usage("--length must be > 0 (omit it to invalidate to the end)");
  }
  req.set_offset(offset);
  req.set_length(length);
  absl::StatusOr<v1::InvalidateCacheResponse> r =
      ctx.client().InvalidateCache(req);
  if (!r.ok()) return ctx.Fail("InvalidateCache", r.status());
  if (json) {
    ctx.out() << CommandContext::ProtoJson(*r);
    return kExitOk;
  }
  ctx.out() << "dropped " << r->extents_dropped() << " cached extent"
            << (r->extents_dropped() == 1 ? "" : "s") << " covering "
            << FormatSize(r->bytes_dropped()) << " (" << r->bytes_dropped()
            << " bytes)\n";
  return kExitOk;
}

int RunStats(CommandContext& ctx) {
  bool json;
  if (auto e = ctx.BasicOutput(&json)) return ctx.Usage(*e);
  absl::StatusOr<v1::GetStatsResponse> r = ctx.client().GetStats(
      ctx.positional().empty() ? "" : ctx.positional()[0]);
  if (!r.ok()) return ctx.Fail("GetStats", r.status());
  std::ostream& out = ctx.out();
  if (json) {
    out << CommandContext::ProtoJson(*r);
    return kExitOk;
  }
  out << "cache memory " << FormatSize(r->total().memory_bytes()) << " of "
      << FormatSize(r->memory_limit_bytes()) << ", " << r->total().entries()
      << " extents held\n";
  std::vector<std::vector<std::string>> rows = {
      {"EXPORT", "CONTEXT", "HITS", "PARTIAL", "MISSES", "UPSTREAM",
       "COALESCED", "FROM CACHE", "EVICTIONS", "INVALIDATIONS", "ENTRIES",
       "MEMORY"}};
  auto add = [&](const std::string& name, const std::string& context,
                 const v1::CacheCounters& c) {
    rows.push_back(
        {name, context, absl::StrCat(c.hits()), absl::StrCat(c.partial_hits()),
         absl::StrCat(c.misses()), absl::StrCat(c.upstream_calls()),
         absl::StrCat(c.coalesced_waits()), FormatSize(c.bytes_from_cache()),
         absl::StrCat(c.evictions()), absl::StrCat(c.invalidations()),
         absl::StrCat(c.entries()), FormatSize(c.memory_bytes())});
  };
  add("(total)", "", r->total());
  for (const v1::ExportStats& e : r->exports()) {
    std::map<std::string, v1::CacheCounters> sorted(e.contexts().begin(),
                                                    e.contexts().end());
    for (const auto& [context, c] : sorted) add(e.export_name(), context, c);
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
    out << line << "\n";
  }
  if (!r->exports().empty()) {
    out << "\n";
    for (const v1::ExportStats& e : r->exports()) {
      out << e.export_name() << ": upstream calls " << e.upstream_calls()
          << ", errors " << e.upstream_errors() << ", reconnects "
          << e.reconnects() << "\n";
    }
  }
  return kExitOk;
}

}  // namespace

CommandSpec InvalidateCommand() {
  return {"invalidate",
          "[EXPORT]",
          "drop cached extents (of one export, or of all)",
          "Use it after writing to a disk through a path blockmeta cannot see.",
          0,
          1,
          {{"context", "NAME", "only this context (default: all)"},
           kOffsetFlag,
           kLengthFlag,
           kOutputBasicFlag},
          &RunInvalidate};
}

CommandSpec StatsCommand() {
  return {"stats",
          "[EXPORT]",
          "cache and upstream counters",
          "",
          0,
          1,
          {kOutputBasicFlag},
          &RunStats};
}

}  // namespace blockmeta::client
