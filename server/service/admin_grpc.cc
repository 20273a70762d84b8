// server/service/admin_grpc.cc — see admin_grpc.h.
#include "server/service/admin_grpc.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/grpc_security_constants.h"
#include "grpcpp/security/auth_context.h"
#include "server/common/log.h"
#include "server/service/call_context.h"
#include "server/service/grpc_status.h"
#include "server/service/unary_on_pool.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

constexpr absl::Duration kDefaultAdminDeadline = absl::Seconds(10);

std::vector<std::string> PeerIdentities(grpc::CallbackServerContext* ctx) {
  std::vector<std::string> out;
  std::shared_ptr<const grpc::AuthContext> auth = ctx->auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return out;
  for (const char* property :
       {GRPC_X509_SAN_PROPERTY_NAME, GRPC_X509_CN_PROPERTY_NAME}) {
    for (const grpc::string_ref& v : auth->FindPropertyValues(property)) {
      out.emplace_back(v.data(), v.size());
    }
  }
  return out;
}

void Audit(absl::string_view method, const std::string& export_name,
           grpc::CallbackServerContext* ctx, const std::string& who,
           const absl::Status& status, absl::Time start) {
  LogInfo("admin_call",
          {{"method", method},
           {"export", export_name},
           {"peer", ctx->peer()},
           {"identity", who},
           {"code", absl::StatusCodeToString(status.code())},
           {"error", std::string(status.message())},
           {"ms", absl::ToInt64Milliseconds(absl::Now() - start)}});
}

}  // namespace

bool AdminCallAllowed(const std::string& peer,
                      const std::vector<std::string>& identities,
                      const std::vector<std::string>& admin_identities,
                      std::string* who) {
  if (absl::StartsWith(peer, "unix:")) {
    *who = "unix socket";
    return true;
  }
  for (const std::string& id : identities) {
    if (std::find(admin_identities.begin(), admin_identities.end(), id) !=
        admin_identities.end()) {
      *who = id;
      return true;
    }
  }
  *who = identities.empty() ? "" : identities.front();
  return false;
}

AdminGrpcService::AdminGrpcService(AdminService* service,
                                   std::vector<std::string> admin_identities)
    : service_(service), admin_identities_(std::move(admin_identities)) {}

absl::Status AdminGrpcService::Authorize(grpc::CallbackServerContext* context,
                                         std::string* who) const {
  if (AdminCallAllowed(context->peer(), PeerIdentities(context),
                       admin_identities_, who)) {
    return absl::OkStatus();
  }
  return absl::PermissionDeniedError(
      "blockmeta.v1.Admin is served only over the gRPC Unix socket or to an "
      "mTLS client whose certificate identity is in admin_identities");
}

grpc::ServerUnaryReactor* AdminGrpcService::AddExport(
    grpc::CallbackServerContext* context, const v1::AddExportRequest* request,
    v1::AddExportResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  std::string who;
  if (absl::Status s = Authorize(context, &who); !s.ok()) {
    Audit("AddExport", request->config().name(), context, who, s, start);
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  const absl::Time deadline = CallDeadline(context, kDefaultAdminDeadline);
  FinishOnPool(
      pool_, context, reactor, response,
      [this, request, deadline] {
        return service_->AddExport(*request, deadline);
      },
      [context, request, who, start](const absl::Status& s) {
        Audit("AddExport", request->config().name(), context, who, s, start);
      });
  return reactor;
}

grpc::ServerUnaryReactor* AdminGrpcService::RemoveExport(
    grpc::CallbackServerContext* context,
    const v1::RemoveExportRequest* request,
    v1::RemoveExportResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  std::string who;
  if (absl::Status s = Authorize(context, &who); !s.ok()) {
    Audit("RemoveExport", request->name(), context, who, s, start);
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  const absl::Time deadline = CallDeadline(context, kDefaultAdminDeadline);
  FinishOnPool(
      pool_, context, reactor, response,
      [this, request, deadline] {
        return service_->RemoveExport(*request, deadline);
      },
      [context, request, who, start](const absl::Status& s) {
        Audit("RemoveExport", request->name(), context, who, s, start);
      });
  return reactor;
}

grpc::ServerUnaryReactor* AdminGrpcService::UpdateExport(
    grpc::CallbackServerContext* context,
    const v1::UpdateExportRequest* request,
    v1::UpdateExportResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  std::string who;
  absl::Status status = Authorize(context, &who);
  if (status.ok()) {
    absl::StatusOr<v1::UpdateExportResponse> r =
        service_->UpdateExport(*request);
    status = r.status();
    if (r.ok()) *response = *std::move(r);
  }
  Audit("UpdateExport", request->config().name(), context, who, status, start);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* AdminGrpcService::ListExports(
    grpc::CallbackServerContext* context, const v1::AdminListExportsRequest*,
    v1::AdminListExportsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Time start = absl::Now();
  std::string who;
  absl::Status status = Authorize(context, &who);
  if (status.ok()) {
    absl::StatusOr<v1::AdminListExportsResponse> r = service_->ListExports();
    status = r.status();
    if (r.ok()) *response = *std::move(r);
  }
  Audit("ListExports", "", context, who, status, start);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace blockmeta
