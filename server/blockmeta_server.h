// server/blockmeta_server.h — assembles one blockmeta process: the export
// registry and upstreams, the shared ExtentCache, the one worker pool (with
// per-export lanes), the gRPC server (BlockMeta, CSI SnapshotMetadata,
// health, reflection, metrics interceptor), the metrics endpoint and the
// NBD shim.
//
// Exports change at run time: Reload() applies a config file's export set
// (SIGHUP), the Admin service adds and removes exports; the registry's hooks
// keep the cache (TTL, reconnect invalidation, freeing a removed export),
// the NBD shim's export list and its sessions in step.
//
// Health (grpc.health.v1, export_health.h): every export's service name
// answers from the registry itself, so it exists from the moment the export
// is added (file or Admin API) and is gone the moment it is removed; the
// hooks and a 500 ms loop push changes to Watch streams.
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
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/common/mutex.h"
#include "server/common/unix_socket.h"
#include "server/service/export_health.h"
#include "server/upstream/export_registry.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace blockmeta {

class ExtentCache;
class ExtentStore;
class AdminService;
class AdminGrpcService;
class WorkerPools;
class Admission;
class ExtentService;
class Metrics;
class BlockMetaGrpcService;
class CsiIdentityService;
class CsiService;
class CsiSnapshotMetadataService;
class NbdServer;
class HealthGrpcService;

// Fills unset fields with the documented defaults (config.proto).
void ApplyDefaults(blockmeta::v1::ServerConfig* config);

class BlockMetaServer {
 public:
  static absl::StatusOr<std::unique_ptr<BlockMetaServer>> Create(
      blockmeta::v1::ServerConfig config);
  ~BlockMetaServer();

  // Binds and serves. Errors: INVALID_ARGUMENT / UNAVAILABLE when a
  // listener cannot be bound (with the address).
  absl::Status Start();
  void Shutdown(absl::Duration grace);

  // Applies the exports of a re-read config file (see
  // ExportRegistry::ApplyFile); INVALID_ARGUMENT leaves everything as it
  // was. Logs what changed, and a warning when non-export settings differ
  // from SetStartupFile's (they need a restart).
  absl::Status Reload(const blockmeta::v1::ServerConfig& file);
  // The file as read at start-up (before flags), for Reload's comparison.
  void SetStartupFile(blockmeta::v1::ServerConfig file);

  int grpc_port() const { return grpc_port_; }
  int nbd_port() const { return nbd_port_; }
  int metrics_port() const { return metrics_port_; }

 private:
  explicit BlockMetaServer(blockmeta::v1::ServerConfig config);
  void HealthLoop();
  ExportRegistry::Hooks MakeHooks();
  // Gives the shim the registry's current export list.
  void RefreshShim();

  const blockmeta::v1::ServerConfig config_;
  // The cache, the shim and the services outlive the registry (the
  // destructor resets it first): upstream threads and the registry's hooks
  // call into them until it is gone.
  std::unique_ptr<ExtentCache> cache_;
  std::shared_ptr<ExtentStore> store_;  // null when off
  std::unique_ptr<ExportRegistry> registry_;
  std::unique_ptr<WorkerPools> pools_;
  std::unique_ptr<Admission> admission_;
  // Before metrics_, which reads the shim's counters at each scrape until
  // its listener is gone.
  std::unique_ptr<NbdServer> nbd_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ExtentService> service_;
  std::unique_ptr<BlockMetaGrpcService> grpc_service_;
  std::unique_ptr<CsiService> csi_;
  std::unique_ptr<CsiIdentityService> csi_identity_;
  std::unique_ptr<CsiSnapshotMetadataService> csi_service_;
  std::unique_ptr<AdminService> admin_;
  std::unique_ptr<AdminGrpcService> admin_grpc_;
  // grpc.health.v1 (export_health.h says what each service name answers).
  std::unique_ptr<ExportHealth> export_health_;
  std::unique_ptr<HealthGrpcService> health_;
  std::unique_ptr<grpc::Server> server_;
  // The gRPC and CSI Unix socket files, published at their paths once gRPC
  // listens under private names (server/common/unix_socket.h); each removes
  // its path at destruction if it is still ours. Reset in Shutdown().
  std::vector<std::unique_ptr<OwnedUnixSocket>> unix_sockets_;
  blockmeta::v1::ServerConfig startup_file_;  // set before Start()
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
