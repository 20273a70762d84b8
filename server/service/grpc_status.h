// server/service/grpc_status.h — the one place absl::Status becomes
// grpc::Status. Codes map one to one (both follow google.rpc.Code); the
// message is kept verbatim.
#ifndef BLOCKMETA_SERVER_SERVICE_GRPC_STATUS_H_
#define BLOCKMETA_SERVER_SERVICE_GRPC_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace blockmeta {

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()),
                      std::string(s.message()));
}

inline absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      s.error_message());
}

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_GRPC_STATUS_H_
