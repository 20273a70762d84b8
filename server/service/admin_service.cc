// server/service/admin_service.cc — see admin_service.h.
#include "server/service/admin_service.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/quote.h"
#include "server/common/log.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

// The name of RemoveExport: required and bounded like every export name
// (AddExport and UpdateExport check theirs in ValidateExportConfig), so a
// huge name gets INVALID_ARGUMENT with a bounded message.
absl::Status ValidateName(const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("name is required");
  if (name.size() > kMaxExportNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("export name ", QuoteBounded(name), " is longer than ",
                     kMaxExportNameBytes, " bytes"));
  }
  return absl::OkStatus();
}

// How long RemoveExport waits for the removed generation to drain: the
// export's calls fail at once (its upstream was closed), so it usually
// drains in milliseconds; an immediate re-add then needs no wait. Never
// longer: removal does not wait for the upstream.
constexpr absl::Duration kRemoveDrainWait = absl::Milliseconds(250);

// When a call that waits must stop waiting to answer in time: the reply
// has to reach the caller before its deadline, or the caller sees a bare
// DEADLINE_EXCEEDED instead of the cause. A tenth of the time left, at
// least 100 ms and at most 2 s, is kept for that.
absl::Time AnswerBy(absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return deadline;
  const absl::Duration margin = std::clamp(
      (deadline - absl::Now()) / 10, absl::Milliseconds(100), absl::Seconds(2));
  return deadline - margin;
}

}  // namespace

v1::AdminExport ToAdminExport(const ExportEntry& e) {
  v1::AdminExport out;
  *out.mutable_config() = e.config;
  out.set_origin(e.origin == ExportOrigin::kApi ? v1::EXPORT_ORIGIN_API
                                                : v1::EXPORT_ORIGIN_FILE);
  out.set_generation(e.generation);
  const bool ready = e.upstream->Ready();
  out.set_state(ready ? v1::EXPORT_STATE_READY : v1::EXPORT_STATE_UNAVAILABLE);
  if (!ready) out.set_last_error(e.upstream->LastError());
  return out;
}

absl::StatusOr<v1::AddExportResponse> AdminService::AddExport(
    const v1::AddExportRequest& request, absl::Time deadline) {
  if (!request.has_config()) {
    return absl::InvalidArgumentError("export is required");
  }
  const v1::ExportConfig& config = request.config();
  if (absl::Status s = ValidateExportConfig(config); !s.ok()) return s;
  const absl::Time answer_by = AnswerBy(deadline);
  // A name removed a moment ago: let its old generation finish first (if
  // it does not in time, Add says so: UNAVAILABLE, still being removed).
  registry_->WaitDrained(config.name(), answer_by);
  absl::StatusOr<ExportRegistry::AddResult> added =
      registry_->Add(config, ExportOrigin::kApi);
  if (!added.ok()) return added.status();
  const ExportRef& e = added->entry;
  if (!e->upstream->WaitReady(answer_by)) {
    std::string why = e->upstream->LastError();
    if (why.empty()) why = "not connected yet";
    const bool remove = request.remove_on_failure() && added->created;
    if (remove) (void)registry_->Remove(config.name());
    return absl::UnavailableError(absl::StrCat(
        "export \"", config.name(),
        "\": upstream not ready before the deadline: ", why,
        remove
            ? " (removed again)"
            : (added->created ? " (the export stays and keeps reconnecting)"
                              : " (it existed before this call and stays)")));
  }
  v1::AddExportResponse response;
  response.set_created(added->created);
  *response.mutable_export_info() = ToAdminExport(*e);
  return response;
}

absl::StatusOr<v1::RemoveExportResponse> AdminService::RemoveExport(
    const v1::RemoveExportRequest& request, absl::Time deadline) {
  if (absl::Status s = ValidateName(request.name()); !s.ok()) return s;
  absl::StatusOr<ExportRef> gone = registry_->Remove(request.name());
  if (!gone.ok()) return gone.status();
  v1::RemoveExportResponse response;
  response.set_generation((*gone)->generation);
  gone->reset();  // our reference must not keep it alive
  // The export's calls, streams and sessions already failed (the registry
  // closed its upstream); only the drain (the upstream object freed, a
  // spawned server reaped, cache keys freed) may still run. Wait for it
  // briefly, never for the upstream.
  const absl::Time wait_until =
      std::min(AnswerBy(deadline), absl::Now() + kRemoveDrainWait);
  if (!registry_->WaitDrained(request.name(), wait_until)) {
    LogInfo("export_remove_draining", {{"export", request.name()}});
  }
  return response;
}

absl::StatusOr<v1::UpdateExportResponse> AdminService::UpdateExport(
    const v1::UpdateExportRequest& request) {
  if (!request.has_config()) {
    return absl::InvalidArgumentError("export is required");
  }
  absl::StatusOr<ExportRef> now = registry_->Update(request.config());
  if (!now.ok()) return now.status();
  v1::UpdateExportResponse response;
  *response.mutable_export_info() = ToAdminExport(**now);
  return response;
}

absl::StatusOr<v1::AdminListExportsResponse> AdminService::ListExports() const {
  v1::AdminListExportsResponse response;
  for (const ExportRef& e : registry_->All()) {
    *response.add_exports() = ToAdminExport(*e);
  }
  return response;
}

}  // namespace blockmeta
