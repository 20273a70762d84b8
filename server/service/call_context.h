// server/service/call_context.h — what every gRPC handler of blockmeta
// needs: the transport-free service, the one shared worker pool for
// blocking work (WorkerPools: per-export lanes with a per-export cap),
// admission control, and the default deadline. Plus the helpers that turn
// a gRPC call's deadline into an absl::Time.
#ifndef BLOCKMETA_SERVER_SERVICE_CALL_CONTEXT_H_
#define BLOCKMETA_SERVER_SERVICE_CALL_CONTEXT_H_

#include <chrono>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"
#include "server/common/worker_pools.h"
#include "server/service/admission.h"
#include "server/service/extent_service.h"

namespace blockmeta {

struct CallContext {
  ExtentService* service = nullptr;
  // Blocking work runs on the one shared pool, capped per export.
  WorkerPools* pools = nullptr;
  Admission* admission = nullptr;
  // Used when the client set no deadline.
  absl::Duration default_deadline = absl::Seconds(30);
};

// The call's deadline, or now + default when the client set none.
inline absl::Time CallDeadline(const grpc::CallbackServerContext* ctx,
                               absl::Duration default_deadline) {
  std::chrono::system_clock::time_point d = ctx->deadline();
  if (d == std::chrono::system_clock::time_point::max()) {
    return absl::Now() + default_deadline;
  }
  return absl::FromChrono(d);
}

inline grpc::Status OverloadedStatus(const Admission& a) {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      "server is at its limit of " + std::to_string(a.limit()) +
                          " calls in flight (" +
                          std::to_string(a.per_export_limit()) +
                          " per export); retry with backoff");
}

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_CALL_CONTEXT_H_
