// server/service/metrics.h — Prometheus metrics for blockmeta, served as
// text on http://ADDR/metrics (prometheus-cpp's Exposer).
//
// * gRPC server metrics with the usual names (go-grpc-prometheus style):
//   grpc_server_started_total, grpc_server_handled_total{grpc_code},
//   grpc_server_handling_seconds (histogram), all labelled grpc_service,
//   grpc_method, grpc_type. Recorded by a server interceptor, so every RPC
//   counts, health and reflection included.
// * Cache counters per export and context (blockmeta_cache_*), read from the
//   ExtentCache at scrape time — no double bookkeeping.
// * Upstream block-status calls: blockmeta_upstream_calls_total{export,
//   code} and blockmeta_upstream_call_seconds{export} (histogram). An
//   export's samples go with ForgetExport (its removal).
// * The upstream engine per export, read from Upstream::Stats() at scrape
//   time: blockmeta_upstream_commands_in_flight, _commands_total,
//   _commands_failed_total, _commands_timed_out_total,
//   _caller_deadlines_total, _reconnects_total, _connections_lost_total,
//   _soft_disconnects_total, _health_probes_total{export}, and per
//   connection blockmeta_upstream_connection_in_flight and
//   _connection_max_in_flight{export, conn}.
// * The NBD shim's connections, read at scrape time from a ShimCounters
//   source (SetShimCounters): blockmeta_nbd_connections,
//   _connections_rejected_total, _handshakes_evicted_total,
//   _idle_sessions_evicted_total, _buffered_bytes.
// * The persistent store (server/store), when configured: whole-store
//   figures from a StoreCounters source (SetStoreCounters):
//   blockmeta_store_bytes, _max_bytes, _extents, _evicted_identities_total,
//   _discarded_identities_total, _writes_skipped_total, _set_aside_total,
//   _broken; per export and context from Upstream::Stats():
//   blockmeta_store_hits_total, _misses_total, _writes_total,
//   _extents_read_total, _verify_calls_total{export, context}, and per
//   export blockmeta_store_export_bytes, _verify_failures_total{export}.
//   blockmeta_cache_upstream_calls_total counts only calls the upstream
//   saw: store hits are taken out, the reopen check's calls added.
//
// Thread-safety: all methods are thread-safe (prometheus-cpp's metrics are
// atomic; families lock internally when a new label set first appears).
#ifndef BLOCKMETA_SERVER_SERVICE_METRICS_H_
#define BLOCKMETA_SERVER_SERVICE_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/support/server_interceptor.h"
#include "server/cache/extent_cache.h"
#include "server/upstream/export_registry.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace blockmeta {

// The NBD shim's connection figures (NbdServer's counters), without a
// dependency on the shim.
struct ShimCounters {
  uint64_t connections = 0;         // open now (handshake or session)
  uint64_t rejected = 0;            // refused at the connection cap
  uint64_t evicted_handshakes = 0;  // stopped in their handshake for room
  uint64_t evicted_idle = 0;        // idle sessions stopped for room
  uint64_t evicted_stalled = 0;     // non-reading sessions stopped for room
  uint64_t buffered_bytes = 0;      // requests in hand + unsent replies
  uint64_t max_connections = 0;     // the cap (nbd.max_connections)
};

// The persistent store's figures (ExtentStore::Stats), without a dependency
// on the store.
struct StoreCounters {
  uint64_t bytes = 0;
  uint64_t max_bytes = 0;
  uint64_t extents = 0;
  uint64_t evicted_identities = 0;
  uint64_t discarded_identities = 0;
  uint64_t writes_skipped = 0;
  uint64_t set_aside = 0;
  uint64_t broken = 0;  // 1: the store is off after an error
};

class Metrics {
 public:
  // `exports` (optional, must outlive this) adds the upstream engine's
  // counters of every registered export, read at scrape time.
  explicit Metrics(const ExtentCache* cache,
                   const ExportRegistry* exports = nullptr);
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Serves /metrics on `address` ("host:port", port 0 picks one). Returns
  // the bound port.
  absl::StatusOr<int> Serve(const std::string& address);

  // For ServerBuilder::experimental().SetInterceptorCreators().
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
  InterceptorFactory();

  void RecordUpstreamCall(const std::string& export_name,
                          absl::Duration latency, const absl::Status& status);
  // Drops the export's blockmeta_upstream_calls_total and _call_seconds
  // samples (the export was removed), so a fleet that adds and removes
  // exports all day does not grow /metrics without bound. A call of the
  // export still finishing afterwards records a fresh sample.
  void ForgetExport(const std::string& export_name);

  // Where the shim's counters are read at each scrape. Call before Serve()
  // (and before any scrape), at most once; `read` must stay valid while
  // this object lives and be thread-safe.
  void SetShimCounters(std::function<ShimCounters()> read);
  // The store's source; same rules as SetShimCounters.
  void SetStoreCounters(std::function<StoreCounters()> read);

  // The text exposition of everything, as /metrics serves it (for tests).
  std::string Render() const;

  class Impl;  // implementation detail, shared with the interceptors

 private:
  std::shared_ptr<Impl> impl_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_METRICS_H_
