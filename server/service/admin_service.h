// server/service/admin_service.h — the transport-free logic of
// blockmeta.v1.Admin (proto/blockmeta/v1/admin.proto): add, update, remove
// and list exports at run time, over ExportRegistry.
//
// AddExport waits for a previous generation of the name to drain, adds the
// export (origin API), then waits until its upstream is ready. It stops
// waiting early enough to answer before the caller's deadline (a tenth of
// the time left, 100 ms to 2 s): the caller gets UNAVAILABLE with the
// upstream's last error, never a bare DEADLINE_EXCEEDED; the export stays
// unless remove_on_failure (then it is removed again).
//
// RemoveExport is immediate: it takes the export out (new calls:
// NOT_FOUND) and the registry closes its upstream, so the export's calls,
// streams and NBD sessions end at once with NOT_FOUND "was removed" and
// nothing waits for the upstream. It then waits at most 250 ms for the
// generation to drain (upstream object freed, spawned server reaped, cache
// keys and counters freed; a later AddExport of the name waits for the
// rest).
//
// Blocking: AddExport may wait up to its deadline, RemoveExport 250 ms;
// run them off gRPC callback threads. UpdateExport and ListExports are
// cheap.
// Thread-safety: all methods are thread-safe (the registry serializes).
#ifndef BLOCKMETA_SERVER_SERVICE_ADMIN_SERVICE_H_
#define BLOCKMETA_SERVER_SERVICE_ADMIN_SERVICE_H_

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockmeta/v1/admin.pb.h"
#include "server/upstream/export_registry.h"

namespace blockmeta {

// The Admin API's view of one export.
blockmeta::v1::AdminExport ToAdminExport(const ExportEntry& e);

class AdminService {
 public:
  explicit AdminService(ExportRegistry* registry) : registry_(registry) {}
  AdminService(const AdminService&) = delete;
  AdminService& operator=(const AdminService&) = delete;

  absl::StatusOr<blockmeta::v1::AddExportResponse> AddExport(
      const blockmeta::v1::AddExportRequest& request, absl::Time deadline);
  absl::StatusOr<blockmeta::v1::RemoveExportResponse> RemoveExport(
      const blockmeta::v1::RemoveExportRequest& request, absl::Time deadline);
  absl::StatusOr<blockmeta::v1::UpdateExportResponse> UpdateExport(
      const blockmeta::v1::UpdateExportRequest& request);
  absl::StatusOr<blockmeta::v1::AdminListExportsResponse> ListExports() const;

 private:
  ExportRegistry* const registry_;  // outlives the service
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_ADMIN_SERVICE_H_
