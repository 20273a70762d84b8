// server/service/csi_service.cc — see csi_service.h.
#include "server/service/csi_service.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/quote.h"

namespace blockmeta {
namespace {}  // namespace

absl::StatusOr<std::string> CsiSocketPath(const std::string& address) {
  std::string path = address;
  if (absl::StartsWith(path, "unix://")) {
    path = path.substr(strlen("unix://"));
  } else if (absl::StartsWith(path, "unix:")) {
    path = path.substr(strlen("unix:"));
  }
  if (path.empty() || path[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        "csi.socket ", QuoteBounded(address),
        " is not a Unix socket: use unix:///ABSOLUTE/PATH or /ABSOLUTE/PATH"));
  }
  return path;
}

CsiService::CsiService(const ExportRegistry* registry, ExtentService* extents,
                       CsiServiceOptions options)
    : registry_(registry), extents_(extents), options_(std::move(options)) {}

csi::v1::GetPluginInfoResponse CsiService::GetPluginInfo() const {
  csi::v1::GetPluginInfoResponse r;
  r.set_name(options_.driver_name);
  r.set_vendor_version(options_.driver_version);
  return r;
}

csi::v1::GetPluginCapabilitiesResponse CsiService::GetPluginCapabilities()
    const {
  csi::v1::GetPluginCapabilitiesResponse r;
  r.add_capabilities()->mutable_service()->set_type(
      csi::v1::PluginCapability::Service::SNAPSHOT_METADATA_SERVICE);
  return r;
}

csi::v1::ProbeResponse CsiService::Probe() const {
  bool ready = true;
  for (const ExportRef& e : registry_->All()) {
    ready = ready && e->upstream->Ready();
  }
  csi::v1::ProbeResponse r;
  r.mutable_ready()->set_value(ready);
  return r;
}

absl::StatusOr<ExportRef> CsiService::ResolveSnapshot(const std::string& id,
                                                      const char* field) const {
  if (id.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is required: it names the snapshot"));
  }
  ExportRef by_name;
  for (const ExportRef& e : registry_->All()) {
    if (e->config.csi().snapshot_id() == id) return e;
    if (e->config.name() == id) by_name = e;
  }
  if (by_name != nullptr) return by_name;
  return absl::NotFoundError(
      absl::StrCat("no snapshot ", QuoteBounded(id), " (", field,
                   "): no export has that csi.snapshot_id or name"));
}

std::string CsiService::BaseContext(const ExportEntry& target,
                                    const std::string& base_snapshot_id) {
  const auto& bases = target.config.csi().base_snapshot_bitmaps();
  auto it = bases.find(base_snapshot_id);
  const std::string& bitmap = it == bases.end() ? base_snapshot_id : it->second;
  return absl::StrCat(std::string(kDirtyBitmapPrefix), bitmap);
}

absl::StatusOr<CsiStream> CsiService::Open(
    const ExportEntry& entry, const std::string& context,
    CsiRangeBuilder::Select select, int64_t starting_offset,
    int32_t max_results, const std::string& missing_context_hint) const {
  if (starting_offset < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "starting_offset must not be negative (got ", starting_offset, ")"));
  }
  if (max_results < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_results must not be negative (got ", max_results, ")"));
  }
  const uint64_t block = options_.fixed_block_size;
  uint64_t start = static_cast<uint64_t>(starting_offset);
  if (block != 0) start = start / block * block;
  absl::StatusOr<ExtentService::Cursor> cursor = extents_->PrepareStream(
      entry.config.name(), context, start, 0, kCsiMaxResultsCap);
  if (!cursor.ok()) {
    if (cursor.status().code() == absl::StatusCode::kFailedPrecondition) {
      return absl::FailedPreconditionError(
          absl::StrCat(cursor.status().message(), missing_context_hint));
    }
    return cursor.status();
  }
  CsiStream s;
  s.cursor = *std::move(cursor);
  s.cursor.coalesce = true;
  s.capacity = s.cursor.query.export_size;
  s.max_results = max_results == 0
                      ? options_.default_max_results
                      : std::min<uint32_t>(max_results, kCsiMaxResultsCap);
  s.type = block == 0 ? csi::v1::VARIABLE_LENGTH : csi::v1::FIXED_LENGTH;
  s.builder.emplace(select, block, s.capacity);
  return s;
}

absl::StatusOr<CsiStream> CsiService::PrepareAllocated(
    const csi::v1::GetMetadataAllocatedRequest& request) const {
  absl::StatusOr<ExportRef> entry =
      ResolveSnapshot(request.snapshot_id(), "snapshot_id");
  if (!entry.ok()) return entry.status();
  return Open(**entry, std::string(kBaseAllocation),
              CsiRangeBuilder::Select::kAllocated, request.starting_offset(),
              request.max_results(), "");
}

absl::StatusOr<CsiStream> CsiService::PrepareDelta(
    const csi::v1::GetMetadataDeltaRequest& request) const {
  if (request.base_snapshot_id().empty()) {
    return absl::InvalidArgumentError(
        "base_snapshot_id is required: it names the snapshot (change "
        "tracking checkpoint) the delta starts from");
  }
  absl::StatusOr<ExportRef> entry =
      ResolveSnapshot(request.target_snapshot_id(), "target_snapshot_id");
  if (!entry.ok()) return entry.status();
  return Open(
      **entry, BaseContext(**entry, request.base_snapshot_id()),
      CsiRangeBuilder::Select::kDirty, request.starting_offset(),
      request.max_results(),
      absl::StrCat(". No change tracking from base snapshot ",
                   QuoteBounded(request.base_snapshot_id()),
                   " exists for this volume: perform a full backup instead"));
}

absl::StatusOr<CsiChunk> CsiService::Next(CsiStream* s, absl::Time deadline) {
  while (!s->source_done && s->builder->Ready(false) < s->max_results) {
    absl::StatusOr<ExtentService::Batch> batch =
        extents_->NextBatch(&s->cursor, deadline);
    if (!batch.ok()) return batch.status();
    for (const Extent& e : batch->extents) s->builder->Add(e);
    s->source_done = batch->done;
  }
  CsiChunk chunk;
  chunk.ranges = s->builder->Take(s->max_results, s->source_done);
  chunk.done = s->source_done && s->builder->Ready(true) == 0;
  return chunk;
}

}  // namespace blockmeta
