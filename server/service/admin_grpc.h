// server/service/admin_grpc.h — the blockmeta.v1.Admin gRPC service: access
// control, audit log and a thin callback-API layer over AdminService.
//
// Access: a call is served only when it came over the gRPC Unix socket
// (peer "unix:...") or its TLS peer is authenticated with a certificate
// whose subject alternative name or common name is in `admin_identities`;
// otherwise PERMISSION_DENIED. Every call, allowed or not, is logged once
// as "admin_call" (method, export, peer, identity, code, ms) at info level.
//
// AddExport and RemoveExport may wait for an upstream or a drain, so they
// run on a small pool of their own, never on a gRPC callback thread;
// UpdateExport and ListExports answer inline. A call without a deadline
// gets 10 s.
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_SERVICE_ADMIN_GRPC_H_
#define BLOCKMETA_SERVER_SERVICE_ADMIN_GRPC_H_

#include <string>
#include <vector>

#include "blockmeta/v1/admin.grpc.pb.h"
#include "server/common/worker_pool.h"
#include "server/service/admin_service.h"

namespace blockmeta {

// The access rule alone (for tests): `peer` is ServerContext::peer(),
// `identities` the authenticated certificate identities (empty without
// mTLS). On success *who names the caller ("unix socket" or the identity).
bool AdminCallAllowed(const std::string& peer,
                      const std::vector<std::string>& identities,
                      const std::vector<std::string>& admin_identities,
                      std::string* who);

class AdminGrpcService final : public blockmeta::v1::Admin::CallbackService {
 public:
  AdminGrpcService(AdminService* service,
                   std::vector<std::string> admin_identities);

  grpc::ServerUnaryReactor* AddExport(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::AddExportRequest* request,
      blockmeta::v1::AddExportResponse* response) override;
  grpc::ServerUnaryReactor* RemoveExport(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::RemoveExportRequest* request,
      blockmeta::v1::RemoveExportResponse* response) override;
  grpc::ServerUnaryReactor* UpdateExport(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::UpdateExportRequest* request,
      blockmeta::v1::UpdateExportResponse* response) override;
  grpc::ServerUnaryReactor* ListExports(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::AdminListExportsRequest* request,
      blockmeta::v1::AdminListExportsResponse* response) override;

 private:
  // PERMISSION_DENIED unless allowed; *who as AdminCallAllowed.
  absl::Status Authorize(grpc::CallbackServerContext* context,
                         std::string* who) const;

  AdminService* const service_;
  const std::vector<std::string> admin_identities_;
  WorkerPool pool_{2};  // blocking admin calls; last member: joined first
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_ADMIN_GRPC_H_
