// server/service/metrics.cc — see metrics.h.
#include "server/service/metrics.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "server/common/mutex.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace {

const char* CodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "Canceled",
                                       "Unknown",
                                       "InvalidArgument",
                                       "DeadlineExceeded",
                                       "NotFound",
                                       "AlreadyExists",
                                       "PermissionDenied",
                                       "ResourceExhausted",
                                       "FailedPrecondition",
                                       "Aborted",
                                       "OutOfRange",
                                       "Unimplemented",
                                       "Internal",
                                       "Unavailable",
                                       "DataLoss",
                                       "Unauthenticated"};
  if (code < 0 || code > 16) return "Unknown";
  return kNames[code];
}

const char* RpcTypeName(grpc::experimental::ServerRpcInfo::Type t) {
  using T = grpc::experimental::ServerRpcInfo::Type;
  switch (t) {
    case T::UNARY:
      return "unary";
    case T::CLIENT_STREAMING:
      return "client_stream";
    case T::SERVER_STREAMING:
      return "server_stream";
    case T::BIDI_STREAMING:
      return "bidi_stream";
  }
  return "unknown";
}

// "/pkg.Service/Method" -> ("pkg.Service", "Method").
std::pair<std::string, std::string> SplitMethod(const char* full) {
  absl::string_view m = full == nullptr ? "" : full;
  if (!m.empty() && m[0] == '/') m.remove_prefix(1);
  size_t slash = m.find('/');
  if (slash == absl::string_view::npos) return {std::string(m), ""};
  return {std::string(m.substr(0, slash)), std::string(m.substr(slash + 1))};
}

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
      0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
  return *b;
}

using Labels = std::map<std::string, std::string>;

// One metric family per field of a counters struct T, one sample per row.
template <typename T>
struct FieldDef {
  const char* name;
  const char* help;
  prometheus::MetricType type;
  uint64_t T::*field;
};

template <typename T, size_t N>
std::vector<prometheus::MetricFamily> BuildFamilies(
    const FieldDef<T> (&defs)[N], const std::vector<Labels>& labels,
    const std::vector<T>& rows) {
  std::vector<prometheus::MetricFamily> out;
  for (const FieldDef<T>& d : defs) {
    prometheus::MetricFamily f;
    f.name = d.name;
    f.help = d.help;
    f.type = d.type;
    for (size_t i = 0; i < rows.size(); ++i) {
      prometheus::ClientMetric m;
      m.label.reserve(labels[i].size());
      for (const auto& [k, v] : labels[i]) m.label.push_back({k, v});
      double v = static_cast<double>(rows[i].*d.field);
      if (d.type == prometheus::MetricType::Counter) {
        m.counter.value = v;
      } else {
        m.gauge.value = v;
      }
      f.metric.push_back(std::move(m));
    }
    out.push_back(std::move(f));
  }
  return out;
}

// Each export's store counters per context (Upstream::Stats), read before
// the cache's counters so that a store hit seen here was already counted
// by the cache as a call (the difference never goes negative).
std::map<std::pair<std::string, std::string>, UpstreamStats::StoreContext>
StoreContexts(const ExportRegistry* registry) {
  std::map<std::pair<std::string, std::string>, UpstreamStats::StoreContext>
      out;
  if (registry == nullptr) return out;
  for (const ExportRef& e : registry->All()) {
    UpstreamStats st = e->upstream->Stats();
    for (const auto& [context, k] : st.store_contexts) {
      out[{e->config.name(), context}] = k;
    }
  }
  return out;
}

// Reads the cache's counters at scrape time.
class CacheCollector final : public prometheus::Collectable {
 public:
  CacheCollector(const ExtentCache* cache, const ExportRegistry* registry)
      : cache_(cache), registry_(registry) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using Def = FieldDef<CacheCounters>;
    static const Def kDefs[] = {
        {"blockmeta_cache_hits_total", "Queries answered entirely from cache",
         prometheus::MetricType::Counter, &CacheCounters::hits},
        {"blockmeta_cache_partial_hits_total",
         "Queries answered partly from cache", prometheus::MetricType::Counter,
         &CacheCounters::partial_hits},
        {"blockmeta_cache_misses_total", "Queries with nothing cached",
         prometheus::MetricType::Counter, &CacheCounters::misses},
        {"blockmeta_cache_upstream_calls_total",
         "Upstream block-status calls (the cache's and bypassing ones)",
         prometheus::MetricType::Counter, &CacheCounters::upstream_calls},
        {"blockmeta_cache_coalesced_waits_total",
         "Callers that waited for another caller's upstream call",
         prometheus::MetricType::Counter, &CacheCounters::coalesced_waits},
        {"blockmeta_cache_bytes_from_cache_total",
         "Bytes of answers served from cache", prometheus::MetricType::Counter,
         &CacheCounters::bytes_from_cache},
        {"blockmeta_cache_bytes_from_upstream_total",
         "Bytes of answers that came from the upstream",
         prometheus::MetricType::Counter, &CacheCounters::bytes_from_upstream},
        {"blockmeta_cache_evictions_total", "Extents evicted",
         prometheus::MetricType::Counter, &CacheCounters::evictions},
        {"blockmeta_cache_invalidations_total", "Invalidation calls",
         prometheus::MetricType::Counter, &CacheCounters::invalidations},
        {"blockmeta_cache_stale_fills_dropped_total",
         "Upstream answers dropped because an invalidation overlapped them",
         prometheus::MetricType::Counter, &CacheCounters::stale_fills_dropped},
        {"blockmeta_cache_read_ahead_issued_total",
         "Read-ahead fetches issued for sequential scans",
         prometheus::MetricType::Counter, &CacheCounters::read_ahead_issued},
        {"blockmeta_cache_read_ahead_hits_total",
         "Read-ahead windows a later query read",
         prometheus::MetricType::Counter, &CacheCounters::read_ahead_hits},
        {"blockmeta_cache_read_ahead_wasted_total",
         "Read-ahead windows nobody read", prometheus::MetricType::Counter,
         &CacheCounters::read_ahead_wasted},
        {"blockmeta_cache_read_ahead_walks_total",
         "Read-ahead runs started by a scan detected by position",
         prometheus::MetricType::Counter, &CacheCounters::read_ahead_walks},
        {"blockmeta_cache_prefetch_issued_total",
         "Whole-map prefetch fetches issued", prometheus::MetricType::Counter,
         &CacheCounters::prefetch_issued},
        {"blockmeta_cache_prefetch_bytes_total",
         "Bytes of map brought by whole-map prefetch",
         prometheus::MetricType::Counter, &CacheCounters::prefetch_bytes},
        {"blockmeta_cache_prefetch_hits_total",
         "Queries that waited for a prefetch fetch in flight",
         prometheus::MetricType::Counter, &CacheCounters::prefetch_hits},
        {"blockmeta_cache_prefetch_completed_total",
         "Whole-map prefetches that reached the export end",
         prometheus::MetricType::Counter, &CacheCounters::prefetch_completed},
        {"blockmeta_cache_prefetch_inflight",
         "Whole-map prefetch fetches in flight now",
         prometheus::MetricType::Gauge, &CacheCounters::prefetch_inflight},
        {"blockmeta_cache_detached_waits_total",
         "Callers that gave up while their upstream call ran on",
         prometheus::MetricType::Counter, &CacheCounters::detached_waits},
        {"blockmeta_cache_entries", "Extents cached now",
         prometheus::MetricType::Gauge, &CacheCounters::entries},
        {"blockmeta_cache_memory_bytes", "Approximate cache memory now",
         prometheus::MetricType::Gauge, &CacheCounters::memory_bytes},
    };
    std::map<std::pair<std::string, std::string>, UpstreamStats::StoreContext>
        store = StoreContexts(registry_);
    std::vector<CacheKey> keys = cache_->Keys();
    std::vector<Labels> labels;
    std::vector<CacheCounters> values;
    labels.reserve(keys.size());
    values.reserve(keys.size());
    for (const CacheKey& k : keys) {
      labels.push_back({{"context", k.context}, {"export", k.export_name}});
      CacheCounters c = cache_->Counters(k);
      if (auto it = store.find({k.export_name, k.context}); it != store.end()) {
        c.upstream_calls = c.upstream_calls -
                           std::min(c.upstream_calls, it->second.hits) +
                           it->second.verify_calls;
      }
      values.push_back(c);
    }
    return BuildFamilies(kDefs, labels, values);
  }

 private:
  const ExtentCache* cache_;
  const ExportRegistry* registry_;  // may be null
};

// Reads every export's upstream engine counters (Upstream::Stats) at scrape
// time: whole-upstream figures labelled by export, per-connection gauges
// labelled by export and connection index. Exports are listed per scrape,
// so removed exports disappear and added ones appear.
class UpstreamCollector final : public prometheus::Collectable {
 public:
  explicit UpstreamCollector(const ExportRegistry* registry)
      : registry_(registry) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using Def = FieldDef<UpstreamStats>;
    using C = prometheus::MetricType;
    static const Def kDefs[] = {
        {"blockmeta_upstream_commands_in_flight",
         "NBD commands sent to the upstream and not yet answered", C::Gauge,
         &UpstreamStats::commands_in_flight},
        {"blockmeta_upstream_commands_total", "NBD commands sent", C::Counter,
         &UpstreamStats::commands_issued},
        {"blockmeta_upstream_commands_failed_total",
         "NBD commands answered with an error or lost", C::Counter,
         &UpstreamStats::commands_failed},
        {"blockmeta_upstream_commands_timed_out_total",
         "NBD commands that exceeded upstream_timeout_ms (connection closed)",
         C::Counter, &UpstreamStats::commands_timed_out},
        {"blockmeta_upstream_caller_deadlines_total",
         "Callers whose own deadline passed while their command ran on",
         C::Counter, &UpstreamStats::caller_deadlines_passed},
        {"blockmeta_upstream_reconnects_total",
         "Reconnect rounds that brought a connection back", C::Counter,
         &UpstreamStats::reconnects},
        {"blockmeta_upstream_connections_lost_total",
         "Upstream connections lost", C::Counter,
         &UpstreamStats::connections_lost},
        {"blockmeta_upstream_soft_disconnects_total",
         "Connections closed with NBD_CMD_DISC after ESHUTDOWN", C::Counter,
         &UpstreamStats::soft_disconnects},
        {"blockmeta_upstream_health_probes_total",
         "Small reads sent on idle connections to notice a shutdown",
         C::Counter, &UpstreamStats::health_probes},
        {"blockmeta_upstream_bitmap_inconsistent_total",
         "Spawned server exits that found a qcow2 dirty bitmap inconsistent",
         C::Counter, &UpstreamStats::bitmap_inconsistent_exits},
    };
    using ConnDef = FieldDef<UpstreamStats::Connection>;
    static const ConnDef kConnDefs[] = {
        {"blockmeta_upstream_connection_in_flight",
         "NBD commands in flight on one upstream connection", C::Gauge,
         &UpstreamStats::Connection::commands_in_flight},
        {"blockmeta_upstream_connection_max_in_flight",
         "Most NBD commands ever in flight at once on one connection", C::Gauge,
         &UpstreamStats::Connection::max_in_flight},
    };
    std::vector<Labels> labels, conn_labels;
    std::vector<UpstreamStats> rows;
    std::vector<UpstreamStats::Connection> conn_rows;
    for (const ExportRef& e : registry_->All()) {
      UpstreamStats st = e->upstream->Stats();
      const std::string& name = e->config.name();
      for (size_t i = 0; i < st.connections.size(); ++i) {
        conn_labels.push_back({{"conn", absl::StrCat(i)}, {"export", name}});
        conn_rows.push_back(st.connections[i]);
      }
      labels.push_back({{"export", name}});
      rows.push_back(std::move(st));
    }
    std::vector<prometheus::MetricFamily> out =
        BuildFamilies(kDefs, labels, rows);
    std::vector<prometheus::MetricFamily> conns =
        BuildFamilies(kConnDefs, conn_labels, conn_rows);
    out.insert(out.end(), conns.begin(), conns.end());
    AddStoreFamilies(labels, rows, &out);
    out.push_back(ReadyFamily());
    return out;
  }

  // The store's per-export and per-context figures (exports using it).
  static void AddStoreFamilies(const std::vector<Labels>& labels,
                               const std::vector<UpstreamStats>& rows,
                               std::vector<prometheus::MetricFamily>* out) {
    using C = prometheus::MetricType;
    using Ctx = UpstreamStats::StoreContext;
    static const FieldDef<Ctx> kCtxDefs[] = {
        {"blockmeta_store_hits_total",
         "Block-status calls answered from the persistent store", C::Counter,
         &Ctx::hits},
        {"blockmeta_store_misses_total",
         "Block-status calls the store could not answer (sent upstream)",
         C::Counter, &Ctx::misses},
        {"blockmeta_store_writes_total",
         "Upstream answers written through to the store", C::Counter,
         &Ctx::writes},
        {"blockmeta_store_extents_read_total",
         "Extents read back from the store", C::Counter, &Ctx::extents_read},
        {"blockmeta_store_verify_calls_total",
         "Upstream calls checking persisted answers at reopen", C::Counter,
         &Ctx::verify_calls},
    };
    static const FieldDef<UpstreamStats> kExportDefs[] = {
        {"blockmeta_store_export_bytes",
         "Bytes of the export's answers in the store", C::Gauge,
         &UpstreamStats::store_bytes},
        {"blockmeta_store_verify_failures_total",
         "Reopen checks that found persisted answers differing from the "
         "upstream (they were discarded)",
         C::Counter, &UpstreamStats::store_verify_failures},
    };
    std::vector<Labels> ctx_labels, export_labels;
    std::vector<Ctx> ctx_rows;
    std::vector<UpstreamStats> export_rows;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].store_identity.empty()) continue;
      export_labels.push_back(labels[i]);
      export_rows.push_back(rows[i]);
      for (const auto& [context, k] : rows[i].store_contexts) {
        Labels l = labels[i];
        l["context"] = context;
        ctx_labels.push_back(std::move(l));
        ctx_rows.push_back(k);
      }
    }
    std::vector<prometheus::MetricFamily> a =
        BuildFamilies(kCtxDefs, ctx_labels, ctx_rows);
    std::vector<prometheus::MetricFamily> b =
        BuildFamilies(kExportDefs, export_labels, export_rows);
    out->insert(out->end(), a.begin(), a.end());
    out->insert(out->end(), b.begin(), b.end());
  }

 private:
  // blockmeta_export_ready{export}: 1 while the export's upstream has a
  // connection up (health service blockmeta.v1.BlockMeta/EXPORT SERVING).
  prometheus::MetricFamily ReadyFamily() const {
    prometheus::MetricFamily f;
    f.name = "blockmeta_export_ready";
    f.help = "1 while the export's upstream is connected, else 0";
    f.type = prometheus::MetricType::Gauge;
    for (const ExportRef& e : registry_->All()) {
      prometheus::ClientMetric m;
      m.label.push_back({"export", e->config.name()});
      m.gauge.value = e->upstream->Ready() ? 1 : 0;
      f.metric.push_back(std::move(m));
    }
    return f;
  }

  const ExportRegistry* registry_;
};

// Reads the NBD shim's connection counters at scrape time.
class ShimCollector final : public prometheus::Collectable {
 public:
  explicit ShimCollector(std::function<ShimCounters()> read)
      : read_(std::move(read)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using Def = FieldDef<ShimCounters>;
    using C = prometheus::MetricType;
    static const Def kDefs[] = {
        {"blockmeta_nbd_connections",
         "NBD shim connections open (in their handshake or in a session)",
         C::Gauge, &ShimCounters::connections},
        {"blockmeta_nbd_connections_rejected_total",
         "NBD clients refused at nbd.max_connections", C::Counter,
         &ShimCounters::rejected},
        {"blockmeta_nbd_handshakes_evicted_total",
         "NBD clients stopped in their handshake to make room at the cap",
         C::Counter, &ShimCounters::evicted_handshakes},
        {"blockmeta_nbd_idle_sessions_evicted_total",
         "Idle NBD sessions stopped to make room at the cap", C::Counter,
         &ShimCounters::evicted_idle},
        {"blockmeta_nbd_stalled_sessions_evicted_total",
         "NBD sessions whose replies had stalled (client not reading) "
         "stopped to make room at the cap",
         C::Counter, &ShimCounters::evicted_stalled},
        {"blockmeta_nbd_buffered_bytes",
         "Request payloads being handled plus replies not yet sent", C::Gauge,
         &ShimCounters::buffered_bytes},
        {"blockmeta_nbd_max_connections",
         "The NBD shim's connection cap (nbd.max_connections)", C::Gauge,
         &ShimCounters::max_connections},
    };
    return BuildFamilies(kDefs, {Labels{}}, {read_()});
  }

 private:
  const std::function<ShimCounters()> read_;
};

// Reads the persistent store's whole-store figures at scrape time.
class StoreCollector final : public prometheus::Collectable {
 public:
  explicit StoreCollector(std::function<StoreCounters()> read)
      : read_(std::move(read)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using Def = FieldDef<StoreCounters>;
    using C = prometheus::MetricType;
    static const Def kDefs[] = {
        {"blockmeta_store_bytes",
         "Bytes of answers in the store (keys + values, before compression)",
         C::Gauge, &StoreCounters::bytes},
        {"blockmeta_store_max_bytes", "The store's bound (store.max_bytes)",
         C::Gauge, &StoreCounters::max_bytes},
        {"blockmeta_store_extents", "Extents in the store", C::Gauge,
         &StoreCounters::extents},
        {"blockmeta_store_evicted_identities_total",
         "Content identities evicted to stay under max_bytes", C::Counter,
         &StoreCounters::evicted_identities},
        {"blockmeta_store_discarded_identities_total",
         "Content identities discarded (changed identity, failed check)",
         C::Counter, &StoreCounters::discarded_identities},
        {"blockmeta_store_writes_skipped_total",
         "Answers not stored (no room under max_bytes, or a store error)",
         C::Counter, &StoreCounters::writes_skipped},
        {"blockmeta_store_set_aside_total",
         "Corrupt or unreadable stores renamed aside", C::Counter,
         &StoreCounters::set_aside},
        {"blockmeta_store_broken",
         "1 when the store is off after an error (serving from upstreams)",
         C::Gauge, &StoreCounters::broken},
    };
    return BuildFamilies(kDefs, {Labels{}}, {read_()});
  }

 private:
  const std::function<StoreCounters()> read_;
};

}  // namespace

class Metrics::Impl {
 public:
  Impl(const ExtentCache* cache, const ExportRegistry* exports)
      : registry(std::make_shared<prometheus::Registry>()),
        cache_collector(std::make_shared<CacheCollector>(cache, exports)),
        upstream_collector(exports == nullptr
                               ? nullptr
                               : std::make_shared<UpstreamCollector>(exports)),
        started(prometheus::BuildCounter()
                    .Name("grpc_server_started_total")
                    .Help("Total number of RPCs started on the server.")
                    .Register(*registry)),
        handled(prometheus::BuildCounter()
                    .Name("grpc_server_handled_total")
                    .Help("Total number of RPCs completed on the server, "
                          "regardless of success or failure.")
                    .Register(*registry)),
        handling(prometheus::BuildHistogram()
                     .Name("grpc_server_handling_seconds")
                     .Help("Histogram of response latency (seconds) of gRPC "
                           "that had been application-level handled by the "
                           "server.")
                     .Register(*registry)),
        upstream_calls(prometheus::BuildCounter()
                           .Name("blockmeta_upstream_calls_total")
                           .Help("Upstream block-status calls by result.")
                           .Register(*registry)),
        upstream_seconds(prometheus::BuildHistogram()
                             .Name("blockmeta_upstream_call_seconds")
                             .Help("Latency of upstream block-status calls.")
                             .Register(*registry)) {}

  std::shared_ptr<prometheus::Registry> registry;
  std::shared_ptr<CacheCollector> cache_collector;
  std::shared_ptr<UpstreamCollector> upstream_collector;  // may be null
  prometheus::Family<prometheus::Counter>& started;
  prometheus::Family<prometheus::Counter>& handled;
  prometheus::Family<prometheus::Histogram>& handling;
  prometheus::Family<prometheus::Counter>& upstream_calls;
  prometheus::Family<prometheus::Histogram>& upstream_seconds;
  std::shared_ptr<ShimCollector> shim_collector;    // null until set
  std::shared_ptr<StoreCollector> store_collector;  // null until set

  // The upstream_calls / upstream_seconds samples of each export, so
  // ForgetExport can remove them (prometheus-cpp removes by pointer).
  struct ExportSamples {
    absl::flat_hash_set<prometheus::Counter*> calls;
    prometheus::Histogram* seconds = nullptr;
  };
  sync::Mutex samples_mu;
  absl::flat_hash_map<std::string, ExportSamples> samples
      ABSL_GUARDED_BY(samples_mu);
};

namespace {

class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(std::shared_ptr<Metrics::Impl> impl,
                     grpc::experimental::ServerRpcInfo* info)
      : impl_(std::move(impl)), start_(std::chrono::steady_clock::now()) {
    auto [service, method] = SplitMethod(info->method());
    labels_ = {{"grpc_service", service},
               {"grpc_method", method},
               {"grpc_type", RpcTypeName(info->type())}};
    impl_->started.Add(labels_).Increment();
  }

  void Intercept(
      grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      grpc::Status status = methods->GetSendStatus();
      std::map<std::string, std::string> with_code = labels_;
      with_code["grpc_code"] = CodeName(status.error_code());
      impl_->handled.Add(with_code).Increment();
      double secs = std::chrono::duration<double>(
                        std::chrono::steady_clock::now() - start_)
                        .count();
      impl_->handling.Add(labels_, LatencyBuckets()).Observe(secs);
    }
    methods->Proceed();
  }

 private:
  std::shared_ptr<Metrics::Impl> impl_;
  std::chrono::steady_clock::time_point start_;
  std::map<std::string, std::string> labels_;
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(std::shared_ptr<Metrics::Impl> impl)
      : impl_(std::move(impl)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(impl_, info);
  }

 private:
  std::shared_ptr<Metrics::Impl> impl_;
};

}  // namespace

Metrics::Metrics(const ExtentCache* cache, const ExportRegistry* exports)
    : impl_(std::make_shared<Impl>(cache, exports)) {}

Metrics::~Metrics() = default;

absl::StatusOr<int> Metrics::Serve(const std::string& address) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot serve metrics on \"", address, "\": ", e.what()));
  }
  exposer_->RegisterCollectable(impl_->registry);
  exposer_->RegisterCollectable(impl_->cache_collector);
  if (impl_->upstream_collector) {
    exposer_->RegisterCollectable(impl_->upstream_collector);
  }
  if (impl_->shim_collector) {
    exposer_->RegisterCollectable(impl_->shim_collector);
  }
  if (impl_->store_collector) {
    exposer_->RegisterCollectable(impl_->store_collector);
  }
  std::vector<int> ports = exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::InternalError("metrics listener has no port");
  }
  return ports.front();
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
Metrics::InterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>(impl_);
}

void Metrics::RecordUpstreamCall(const std::string& export_name,
                                 absl::Duration latency,
                                 const absl::Status& status) {
  // Held from the lookup to the update, so ForgetExport cannot remove (and
  // free) a sample in between.
  sync::MutexLock lock(&impl_->samples_mu);
  prometheus::Counter& calls = impl_->upstream_calls.Add(
      {{"export", export_name},
       {"code", CodeName(static_cast<int>(status.code()))}});
  prometheus::Histogram& seconds =
      impl_->upstream_seconds.Add({{"export", export_name}}, LatencyBuckets());
  {
    Impl::ExportSamples& mine = impl_->samples[export_name];
    mine.calls.insert(&calls);
    mine.seconds = &seconds;
    calls.Increment();
    seconds.Observe(absl::ToDoubleSeconds(latency));
  }
}

void Metrics::ForgetExport(const std::string& export_name) {
  sync::MutexLock lock(&impl_->samples_mu);
  auto it = impl_->samples.find(export_name);
  if (it == impl_->samples.end()) return;
  for (prometheus::Counter* c : it->second.calls)
    impl_->upstream_calls.Remove(c);
  if (it->second.seconds != nullptr) {
    impl_->upstream_seconds.Remove(it->second.seconds);
  }
  impl_->samples.erase(it);
}

void Metrics::SetShimCounters(std::function<ShimCounters()> read) {
  impl_->shim_collector = std::make_shared<ShimCollector>(std::move(read));
}

void Metrics::SetStoreCounters(std::function<StoreCounters()> read) {
  impl_->store_collector = std::make_shared<StoreCollector>(std::move(read));
}

std::string Metrics::Render() const {
  std::vector<prometheus::MetricFamily> families = impl_->registry->Collect();
  std::vector<prometheus::MetricFamily> cache =
      impl_->cache_collector->Collect();
  families.insert(families.end(), cache.begin(), cache.end());
  if (impl_->upstream_collector) {
    std::vector<prometheus::MetricFamily> up =
        impl_->upstream_collector->Collect();
    families.insert(families.end(), up.begin(), up.end());
  }
  if (impl_->shim_collector) {
    std::vector<prometheus::MetricFamily> shim =
        impl_->shim_collector->Collect();
    families.insert(families.end(), shim.begin(), shim.end());
  }
  if (impl_->store_collector) {
    std::vector<prometheus::MetricFamily> store =
        impl_->store_collector->Collect();
    families.insert(families.end(), store.begin(), store.end());
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace blockmeta
