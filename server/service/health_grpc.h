// server/service/health_grpc.h — grpc.health.v1.Health (Check and Watch)
// over a status function, on the callback API.
//
// gRPC's built-in health service only ever adds service names: a name once
// set answers forever, so a removed export would keep a status. This one
// asks `status` on every Check (no copy to go stale), and Watch streams are
// re-evaluated by Refresh(): the owner calls it after exports change and
// periodically (readiness changes without a call).
//
// Check: the status, or NOT_FOUND for an unknown service (health.proto).
// Watch: the current status at once, then each change; SERVICE_UNKNOWN while
// the service is unknown (the stream stays open, as health.proto says). At
// most one write is in flight per stream and only the latest status is
// sent, so a slow watcher costs one pending value, not a queue.
// Shutdown(): every service reads NOT_SERVING from then on; Watch streams
// get NOT_SERVING and end with OK, so they do not hold the server's drain.
//
// Thread-safety: all methods are thread-safe. The service must outlive the
// grpc::Server it is registered with (the server ends every call first).
#ifndef BLOCKMETA_SERVER_SERVICE_HEALTH_GRPC_H_
#define BLOCKMETA_SERVER_SERVICE_HEALTH_GRPC_H_

#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/common/mutex.h"
#include "server/service/export_health.h"

namespace blockmeta {

class HealthGrpcService final
    : public grpc::health::v1::Health::CallbackService {
 public:
  using StatusFn = std::function<HealthStatus(const std::string& service)>;
  explicit HealthGrpcService(StatusFn status);
  ~HealthGrpcService() override;
  HealthGrpcService(const HealthGrpcService&) = delete;
  HealthGrpcService& operator=(const HealthGrpcService&) = delete;

  // Re-evaluates every watched service; streams whose status changed get
  // the new one.
  void Refresh();
  // Everything NOT_SERVING from now on; Watch streams end after saying so.
  void Shutdown();

  grpc::ServerUnaryReactor* Check(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request,
      grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class WatchReactor;
  HealthStatus Evaluate(const std::string& service) const;

  const StatusFn status_;
  // Order: mu_ before a WatchReactor's own mutex.
  sync::Mutex mu_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  // Live Watch streams; each removes itself in OnDone, under mu_.
  absl::flat_hash_set<WatchReactor*> watchers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_HEALTH_GRPC_H_
