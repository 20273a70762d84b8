// server/service/grpc_status.h — the one conversion of an absl::Status from
// the transport-free service (or the upstream) into a grpc::Status. Codes
// map one to one (both follow google.rpc.Code); the message is kept
// verbatim. The gRPC layers still build the few statuses that only they
// can decide directly: CANCELLED when the client cancelled a call, and
// RESOURCE_EXHAUSTED from admission control (OverloadedStatus in
// call_context.h).
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

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_GRPC_STATUS_H_
