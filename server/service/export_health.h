// server/service/export_health.h — what grpc.health.v1 answers for each
// service name, from the export registry (no gRPC here; HealthGrpcService
// serves it).
//
// Service names and their rule:
//   ""                           SERVING while the process serves.
//   "blockmeta.v1.BlockMeta"     the aggregate: SERVING when every counted
//                                export's upstream is connected (true with
//                                no exports).
//   "blockmeta.v1.BlockMeta/E"   export E's upstream is connected; unknown
//                                (NOT_FOUND) when E is not exported, also
//                                the moment E is removed.
// Anything else is unknown.
//
// Which exports the aggregate counts: the exports present when the server
// started count from the start (a process whose configured upstreams are
// not yet connected is not ready). An export added later (Admin AddExport,
// a SIGHUP reload, a replacement's new generation) counts only from the
// first time its upstream is seen connected: until then its own service
// says NOT_SERVING and AddExport reports the failure to its caller, so an
// admin add never turns the aggregate NOT_SERVING on its way in. Once
// counted, an export counts until it is removed (a lost connection turns the
// aggregate NOT_SERVING, as it should).
//
// Thread-safety: all methods are thread-safe. Cost of Status: one registry
// lookup (reader lock, O(log n)), O(n) for the aggregate; no I/O.
#ifndef BLOCKMETA_SERVER_SERVICE_EXPORT_HEALTH_H_
#define BLOCKMETA_SERVER_SERVICE_EXPORT_HEALTH_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "server/common/mutex.h"
#include "server/upstream/export_registry.h"

namespace blockmeta {

enum class HealthStatus { kServing, kNotServing, kUnknown };

// The aggregate's service name, and the prefix of each export's.
inline constexpr char kBlockMetaHealthService[] = "blockmeta.v1.BlockMeta";

// The health-check service name for one export's readiness:
// "blockmeta.v1.BlockMeta/" + export_name.
std::string ExportHealthServiceName(const std::string& export_name);

class ExportHealth {
 public:
  // `registry` must outlive this object and every Status() call.
  explicit ExportHealth(const ExportRegistry* registry);

  // Counts every export the registry holds now toward the aggregate (call
  // once, when the server starts serving its start-up exports).
  void CountCurrentExports();
  // Stops tracking a removed generation (the registry's removed hook).
  void Forget(uint64_t generation);

  HealthStatus Status(const std::string& service);

 private:
  const ExportRegistry* const registry_;
  sync::Mutex mu_;
  // Generations the aggregate counts.
  absl::flat_hash_set<uint64_t> counted_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_EXPORT_HEALTH_H_
