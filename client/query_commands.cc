// client/query_commands.cc — see query_commands.h.
#include "client/query_commands.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/units.h"

namespace blockmeta::client {
namespace {

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

int RunList(CommandContext& ctx) {
  bool json;
  if (auto e = ctx.BasicOutput(&json)) return ctx.Usage(*e);
  absl::StatusOr<v1::ListExportsResponse> r = ctx.client().ListExports();
  if (!r.ok()) return ctx.Fail("ListExports", r.status());
  if (json) {
    ctx.out() << CommandContext::ProtoJson(*r);
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
    ctx.out() << line << "\n";
  }
  return kExitOk;
}

int RunInfo(CommandContext& ctx) {
  bool json;
  if (auto e = ctx.BasicOutput(&json)) return ctx.Usage(*e);
  absl::StatusOr<v1::ExportInfo> r =
      ctx.client().GetExportInfo(ctx.positional()[0]);
  if (!r.ok()) return ctx.Fail("GetExportInfo", r.status());
  if (json) {
    ctx.out() << CommandContext::ProtoJson(*r);
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
    ctx.out() << absl::StrFormat("%-12s %s\n", absl::StrCat(k, ":"), v);
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

int RunHealth(CommandContext& ctx) {
  std::string service = ctx.positional().empty() ? "" : ctx.positional()[0];
  absl::StatusOr<ServingStatus> r = ctx.client().Health(service);
  if (!r.ok()) return ctx.Fail("health check", r.status());
  ctx.out() << ServingStatusName(*r) << "\n";
  return *r == ServingStatus::kServing ? kExitOk : kExitNotServing;
}

}  // namespace

CommandSpec ListCommand() {
  return {"list",
          "",
          "list the exports the server fronts",
          "",
          0,
          0,
          {kOutputBasicFlag},
          &RunList};
}

CommandSpec InfoCommand() {
  return {"info",
          "EXPORT",
          "size, block sizes, capabilities and contexts of an export",
          "",
          1,
          1,
          {kOutputBasicFlag},
          &RunInfo};
}

CommandSpec HealthCommand() {
  return {"health",
          "[SERVICE]",
          "grpc.health.v1 check of the server (or of SERVICE)",
          "Prints SERVING or NOT_SERVING; exits 5 when not serving.",
          0,
          1,
          {},
          &RunHealth};
}

}  // namespace blockmeta::client
