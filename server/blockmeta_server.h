// server/blockmeta_server.h — assembles one blockmeta process: the export
// registry and upstreams, the shared ExtentCache, per-export worker pools, the
// gRPC server (BlockMeta, CSI SnapshotMetadata, health, reflection, metrics
// interceptor), the metrics endpoint and the NBD shim.
//
// Lifecycle: Create() validates the config and builds everything; Start()
// binds the listeners (nothing is served before); Shutdown(grace) marks
// health NOT_SERVING, stops accepting, lets in-flight calls finish until the
// grace period ends and then cancels them, and stops the NBD shim.
// Thread-safety: Start/Shutdown from one thread; the rest is thread-safe.
#ifndef BLOCKMETA_SERVER_BLOCKMETA_SERVER_H_
#define BLOCKMETA_SERVER_BLOCKMETA_SERVER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/common/mutex.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace blockmeta {

class ExportRegistry;
class ExtentCache;
class WorkerPools;
class Admission;
class ExtentService;
class Metrics;
class BlockMetaGrpcService;
class CsiIdentityService;
class CsiService;
class CsiSnapshotMetadataService;
class NbdServer;

// Fills unset fields with the documented defaults (config.proto).
void ApplyDefaults(blockmeta::v1::ServerConfig* config);

// The health-check service name for one export's readiness.
std::string ExportHealthServiceName(const std::string& export_name);

class BlockMetaServer {
 public:
  static absl::StatusOr<std::unique_ptr<BlockMetaServer>> Create(
      blockmeta::v1::ServerConfig config);
  ~BlockMetaServer();

  // Binds and serves. Errors: INVALID_ARGUMENT / UNAVAILABLE when a
  // listener cannot be bound (with the address).
  absl::Status Start();
  void Shutdown(absl::Duration grace);

  int grpc_port() const { return grpc_port_; }
  int nbd_port() const { return nbd_port_; }
  int metrics_port() const { return metrics_port_; }

 private:
  explicit BlockMetaServer(blockmeta::v1::ServerConfig config);
  void HealthLoop();

  const blockmeta::v1::ServerConfig config_;
  // The cache outlives the registry: upstream threads call back into it
  // (generation changes) until the registry is destroyed.
  std::unique_ptr<ExtentCache> cache_;
  std::unique_ptr<ExportRegistry> registry_;
  std::unique_ptr<WorkerPools> pools_;
  std::unique_ptr<Admission> admission_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ExtentService> service_;
  std::unique_ptr<BlockMetaGrpcService> grpc_service_;
  std::unique_ptr<CsiService> csi_;
  std::unique_ptr<CsiIdentityService> csi_identity_;
  std::unique_ptr<CsiSnapshotMetadataService> csi_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<NbdServer> nbd_;
  int grpc_port_ = 0;
  int nbd_port_ = 0;
  int metrics_port_ = 0;

  absl::Notification stop_health_;
  std::thread health_thread_;
  sync::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_BLOCKMETA_SERVER_H_
