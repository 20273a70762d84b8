// server/blockmeta_server.cc — see blockmeta_server.h.
#include "server/blockmeta_server.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/errno_text.h"
#include "google/protobuf/util/message_differencer.h"
#include "grpcpp/ext/health_check_service_server_builder_option.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/server_credentials.h"
#include "server/cache/extent_cache.h"
#include "server/common/log.h"
#include "server/common/tls_grpc.h"
#include "server/common/worker_pools.h"
#include "server/nbd/nbd_server.h"
#include "server/service/admin_grpc.h"
#include "server/service/admin_service.h"
#include "server/service/admission.h"
#include "server/service/block_meta_grpc.h"
#include "server/service/csi_grpc.h"
#include "server/service/extent_service.h"
#include "server/service/health_grpc.h"
#include "server/service/metrics.h"
#include "server/service/request_log.h"
#include "server/store/content_identity.h"
#include "server/store/extent_store.h"
#include "server/upstream/export_registry.h"
#include "server/upstream/nbd_upstream.h"
#include "server/upstream/store_upstream.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(
    const v1::TlsConfig& tls) {
  if (tls.cert_file().empty() && tls.key_file().empty()) {
    if (!tls.client_ca_file().empty()) {
      return absl::InvalidArgumentError(
          "tls.client_ca_file needs tls.cert_file and tls.key_file");
    }
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_file().empty() || tls.key_file().empty()) {
    return absl::InvalidArgumentError(
        "TLS needs both tls.cert_file and tls.key_file");
  }
  // Reloaded when the files change (certificate rotation, no restart).
  return ReloadingServerCredentials(
      {tls.cert_file(), tls.key_file(), tls.client_ca_file()});
}

// Why gRPC could not listen on TCP `address` (host:port), found by binding
// it ourselves (without SO_REUSEPORT, as the server does): "" when that
// bind works or the address does not resolve.
std::string TcpBindError(const std::string& address) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos) return "";
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  struct addrinfo hints = {};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  struct addrinfo* res = nullptr;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(),
                  address.substr(colon + 1).c_str(), &hints, &res) != 0) {
    return "";
  }
  std::string why;
  for (struct addrinfo* a = res; a != nullptr && why.empty(); a = a->ai_next) {
    int fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0) {
      why = errno == EADDRINUSE ? "address already in use (another blockmetad?)"
                                : ErrnoText(errno);
    }
    close(fd);
  }
  freeaddrinfo(res);
  return why;
}

// The store, if configured (store.path). A store that cannot be opened
// even fresh is logged and left off: blockmetad serves from the upstreams.
std::shared_ptr<ExtentStore> OpenStore(const v1::StoreConfig& c) {
  if (c.path().empty()) return nullptr;
  ExtentStoreOptions o;
  o.path = c.path();
  o.max_bytes = c.max_bytes();
  absl::StatusOr<std::shared_ptr<ExtentStore>> s = ExtentStore::Open(o);
  if (!s.ok()) {
    LogError("store_unavailable", {{"path", c.path()},
                                   {"error", s.status().message()},
                                   {"action", "serving from the upstreams"}});
    return nullptr;
  }
  ExtentStoreStats st = (*s)->Stats();
  LogInfo("store_opened", {{"path", c.path()},
                           {"bytes", st.bytes},
                           {"extents", st.extents},
                           {"max_bytes", c.max_bytes()}});
  return *s;
}

// CreateUpstream, behind the store for immutable exports with a content
// identity (server/store/content_identity.h).
ExportRegistry::UpstreamFactory StoreFactory(
    const std::shared_ptr<ExtentStore>& store, uint32_t verify_windows) {
  if (store == nullptr) return nullptr;
  return [store, verify_windows](const v1::ExportConfig& config)
             -> absl::StatusOr<std::unique_ptr<Upstream>> {
    absl::StatusOr<std::unique_ptr<Upstream>> up = CreateUpstream(config);
    std::optional<std::string> identity = ContentIdentity(config);
    if (!up.ok() || !identity.has_value()) return up;
    StoreUpstream::Options o;
    o.export_name = config.name();
    o.identity = *identity;
    o.verify_windows = verify_windows;
    return std::unique_ptr<Upstream>(
        std::make_unique<StoreUpstream>(*std::move(up), store, o));
  };
}

}  // namespace

void ApplyDefaults(v1::ServerConfig* c) {
  if (c->shutdown_grace_seconds() == 0) c->set_shutdown_grace_seconds(20);
  if (c->worker_threads() == 0) c->set_worker_threads(16);
  if (c->max_upstream_calls_per_export() == 0) {
    c->set_max_upstream_calls_per_export(
        std::max<uint32_t>(1, c->worker_threads() / 4));
  }
  // The component defaults have one home: their Options structs.
  const ExtentCache::Options cache_defaults;
  v1::CacheConfig* cache = c->mutable_cache();
  if (cache->memory_limit_bytes() == 0) {
    cache->set_memory_limit_bytes(cache_defaults.memory_limit_bytes);
  }
  if (cache->fetch_window_bytes() == 0) {
    cache->set_fetch_window_bytes(cache_defaults.fetch_window_bytes);
  }
  v1::GrpcConfig* g = c->mutable_grpc();
  if (g->max_inflight_calls() == 0) g->set_max_inflight_calls(256);
  if (g->max_inflight_calls_per_export() == 0) {
    g->set_max_inflight_calls_per_export(
        std::max<uint32_t>(1, g->max_inflight_calls() / 2));
  }
  if (g->max_message_bytes() == 0) g->set_max_message_bytes(16u << 20);
  if (g->keepalive_time_ms() == 0) g->set_keepalive_time_ms(60000);
  if (g->keepalive_timeout_ms() == 0) g->set_keepalive_timeout_ms(20000);
  if (g->default_deadline_ms() == 0) {
    g->set_default_deadline_ms(
        absl::ToInt64Milliseconds(CallContext().default_deadline));
  }
  v1::NbdShimConfig* n = c->mutable_nbd();
  const nbd::ConnectionOptions nbd_defaults;
  if (n->handshake_timeout_ms() == 0) {
    n->set_handshake_timeout_ms(static_cast<uint32_t>(
        absl::ToInt64Milliseconds(nbd_defaults.handshake_timeout)));
  }
  if (n->max_connections() == 0) {
    n->set_max_connections(NbdServerDefaults::kMaxConnections);
  }
  if (n->max_payload_bytes() == 0) {
    n->set_max_payload_bytes(nbd_defaults.handshake.max_payload_bytes);
  }
  if (!c->store().path().empty()) {
    const ExtentStoreOptions store_defaults;
    v1::StoreConfig* st = c->mutable_store();
    if (st->max_bytes() == 0) st->set_max_bytes(store_defaults.max_bytes);
    if (st->verify_windows() == 0) st->set_verify_windows(1);
  }
  if (c->csi().default_max_results() == 0) {
    c->mutable_csi()->set_default_max_results(
        CsiServiceOptions().default_max_results);
  }
}

BlockMetaServer::BlockMetaServer(v1::ServerConfig config)
    : config_(std::move(config)) {}

absl::StatusOr<std::unique_ptr<BlockMetaServer>> BlockMetaServer::Create(
    v1::ServerConfig config) {
  ApplyDefaults(&config);
  uint64_t block = config.csi().fixed_block_size();
  if (block != 0 && (block < 512 || (block & (block - 1)) != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "csi.fixed_block_size must be 0 or a power of two >= 512, not ",
        block));
  }
  if (!config.csi().socket().empty()) {
    absl::StatusOr<std::string> path = CsiSocketPath(config.csi().socket());
    if (!path.ok()) return path.status();
  }
  if (config.grpc_listen().empty() && config.grpc_unix_socket().empty() &&
      config.csi().socket().empty()) {
    return absl::InvalidArgumentError(
        "no gRPC listener: set grpc_listen, grpc_unix_socket and/or "
        "csi.socket");
  }
  std::unique_ptr<BlockMetaServer> s(new BlockMetaServer(std::move(config)));
  const v1::ServerConfig& c = s->config_;
  ExtentCache::Options cache_options;
  cache_options.memory_limit_bytes = c.cache().memory_limit_bytes();
  cache_options.fetch_window_bytes = c.cache().fetch_window_bytes();
  if (c.cache().has_read_ahead_windows()) {
    cache_options.read_ahead_windows = c.cache().read_ahead_windows();
  }
  if (c.cache().ttl_seconds() != 0) {
    cache_options.ttl = absl::Seconds(c.cache().ttl_seconds());
  }
  s->cache_ = std::make_unique<ExtentCache>(cache_options);
  if (absl::Status v = ValidateExports(c); !v.ok()) return v;
  s->store_ = OpenStore(c.store());
  s->registry_ = std::make_unique<ExportRegistry>(
      StoreFactory(s->store_, c.store().verify_windows()));
  s->pools_ = std::make_unique<WorkerPools>(c.worker_threads(),
                                            c.max_upstream_calls_per_export());
  s->admission_ = std::make_unique<Admission>(
      c.grpc().max_inflight_calls(), c.grpc().max_inflight_calls_per_export());
  s->metrics_ = std::make_unique<Metrics>(s->cache_.get(), s->registry_.get());
  ExtentService::Options service_options;
  Metrics* metrics = s->metrics_.get();
  service_options.on_upstream_call = [metrics](const std::string& export_name,
                                               absl::Duration latency,
                                               const absl::Status& status) {
    metrics->RecordUpstreamCall(export_name, latency, status);
  };
  if (s->store_ != nullptr) {
    std::shared_ptr<ExtentStore> store = s->store_;
    service_options.fill_store_stats = [store](v1::GetStatsResponse* r) {
      ExtentStoreStats st = store->Stats();
      r->set_store_path(store->options().path);
      r->set_store_bytes(st.bytes);
      r->set_store_max_bytes(store->options().max_bytes);
    };
    s->metrics_->SetStoreCounters([store] {
      ExtentStoreStats st = store->Stats();
      StoreCounters n;
      n.bytes = st.bytes;
      n.max_bytes = store->options().max_bytes;
      n.extents = st.extents;
      n.evicted_identities = st.evicted_identities;
      n.discarded_identities = st.discarded_identities;
      n.writes_skipped = st.writes_skipped;
      n.set_aside = st.set_aside;
      n.broken = st.broken ? 1 : 0;
      return n;
    });
  }
  s->service_ = std::make_unique<ExtentService>(
      s->registry_.get(), s->cache_.get(), std::move(service_options));
  CallContext ctx;
  ctx.service = s->service_.get();
  ctx.pools = s->pools_.get();
  ctx.admission = s->admission_.get();
  ctx.default_deadline = absl::Milliseconds(c.grpc().default_deadline_ms());
  s->grpc_service_ = std::make_unique<BlockMetaGrpcService>(ctx);
  CsiServiceOptions csi;
  csi.fixed_block_size = c.csi().fixed_block_size();
  csi.default_max_results = c.csi().default_max_results();
  if (!c.csi().driver_name().empty()) csi.driver_name = c.csi().driver_name();
  if (!c.csi().driver_version().empty()) {
    csi.driver_version = c.csi().driver_version();
  }
  s->csi_ =
      std::make_unique<CsiService>(s->registry_.get(), s->service_.get(), csi);
  s->csi_identity_ = std::make_unique<CsiIdentityService>(s->csi_.get());
  s->csi_service_ =
      std::make_unique<CsiSnapshotMetadataService>(ctx, s->csi_.get());
  s->admin_ = std::make_unique<AdminService>(s->registry_.get());
  s->admin_grpc_ = std::make_unique<AdminGrpcService>(
      s->admin_.get(), std::vector<std::string>(c.admin_identities().begin(),
                                                c.admin_identities().end()));
  s->export_health_ = std::make_unique<ExportHealth>(s->registry_.get());
  ExportHealth* export_health = s->export_health_.get();
  s->health_ = std::make_unique<HealthGrpcService>(
      [export_health](const std::string& service) {
        return export_health->Status(service);
      });
  if (!c.nbd_listen().empty() || !c.nbd_unix_socket().empty()) {
    s->nbd_ = std::make_unique<NbdServer>(
        std::vector<nbd::ShimExport>{}, s->cache_.get(),
        WithDefaultTlsFiles(c.nbd(), c.tls()));
    const NbdServer* nbd = s->nbd_.get();  // outlives metrics_ (declared first)
    const uint64_t cap = c.nbd().max_connections();  // after ApplyDefaults
    s->metrics_->SetShimCounters([nbd, cap] {
      ShimCounters n;
      n.connections = nbd->ActiveConnections();
      n.rejected = nbd->RejectedConnections();
      n.evicted_handshakes = nbd->EvictedConnections();
      n.evicted_idle = nbd->EvictedIdleSessions();
      n.evicted_stalled = nbd->EvictedStalledSessions();
      n.buffered_bytes = nbd->BufferedBytes();
      n.max_connections = cap;
      return n;
    });
  }
  s->registry_->SetHooks(s->MakeHooks());
  absl::StatusOr<ExportRegistry::ReloadResult> loaded =
      s->registry_->ApplyFile(c, absl::Now() + absl::Seconds(30));
  if (!loaded.ok()) return loaded.status();
  return s;
}

namespace {

// The shim's view of every export of the registry: the entry keeps owning
// the upstream (the shim's lists hold weak references).
std::vector<nbd::ShimExport> ShimExportsFromRegistry(
    const ExportRegistry& registry) {
  std::vector<nbd::ShimExport> out;
  for (const ExportRef& e : registry.All()) {
    nbd::ShimExport x;
    x.name = e->config.name();
    x.description = e->config.description();
    x.upstream = e->upstream;
    // An immutable export is read-only: NBD_FLAG_READ_ONLY, writes EPERM.
    x.read_only = e->config.read_only() || e->config.immutable();
    x.upstream_timeout = UpstreamTimeout(e->config);
    out.push_back(std::move(x));
  }
  return out;
}

// Whole-map prefetch of an export (ExtentCache::SetExportPrefetch): 0 = off,
// else the fetches kept in flight, one per upstream connection.
// PREFETCH_AUTO prefetches exports whose map cannot change through
// blockmeta: read-only and immutable ones.
uint32_t PrefetchParallel(const v1::ExportConfig& c) {
  const bool read_only = c.read_only() || c.immutable() ||
                         (c.has_image() && c.image().read_only());
  const bool on = c.prefetch() == v1::PREFETCH_WHOLE_MAP ||
                  (c.prefetch() == v1::PREFETCH_AUTO && read_only);
  if (!on) return 0;
  return c.connections() != 0 ? c.connections() : kDefaultUpstreamConnections;
}

}  // namespace

ExportRegistry::Hooks BlockMetaServer::MakeHooks() {
  ExportRegistry::Hooks hooks;
  ExtentCache* cache = cache_.get();
  const absl::Duration default_ttl = cache->options().ttl;
  auto apply_ttl = [cache, default_ttl](const ExportRef& e) {
    // An immutable export's extents never expire.
    cache->SetExportTtl(e->config.name(),
                        e->config.immutable() ? absl::InfiniteDuration()
                        : e->config.cache_ttl_seconds() != 0
                            ? absl::Seconds(e->config.cache_ttl_seconds())
                            : default_ttl);
    cache->SetExportPrefetch(e->config.name(), PrefetchParallel(e->config));
  };
  hooks.added = [this, cache, apply_ttl](const ExportRef& e) {
    apply_ttl(e);
    std::string name = e->config.name();
    e->upstream->SetOnGenerationChange([cache, name] {
      // A reconnected upstream may serve a different image: forget it all.
      ExtentCache::Dropped d = cache->InvalidateExport(name);
      if (d.extents > 0) {
        LogWarning("upstream_reconnected_cache_dropped",
                   {{"export", name}, {"extents_dropped", d.extents}});
      }
    });
    RefreshShim();
    LogInfo("export_added",
            {{"export", name},
             {"generation", e->generation},
             {"origin", e->origin == ExportOrigin::kApi ? "api" : "file"}});
    health_->Refresh();  // Watch streams of this name see it at once
  };
  hooks.updated = [this, apply_ttl](const ExportRef& e) {
    apply_ttl(e);
    RefreshShim();
    LogInfo("export_updated",
            {{"export", e->config.name()}, {"generation", e->generation}});
  };
  hooks.removed = [this](const ExportRef& e) {
    RefreshShim();
    // The registry closed the upstream: the sessions' requests already
    // failed. Stop the sessions, wait for none (each holds the upstream
    // until it ends).
    if (nbd_ != nullptr) {
      nbd_->CloseExport(e->config.name(), absl::ZeroDuration());
    }
    metrics_->ForgetExport(e->config.name());
    export_health_->Forget(e->generation);
    health_->Refresh();  // its name is unknown from now on
    LogInfo("export_removed",
            {{"export", e->config.name()}, {"generation", e->generation}});
  };
  hooks.drained = [cache](const std::string& name, uint64_t generation) {
    ExtentCache::Dropped d = cache->RemoveExport(name);
    LogInfo("export_drained", {{"export", name},
                               {"generation", generation},
                               {"extents_freed", d.extents}});
  };
  return hooks;
}

void BlockMetaServer::RefreshShim() {
  if (nbd_ != nullptr) nbd_->SetExports(ShimExportsFromRegistry(*registry_));
}

absl::Status BlockMetaServer::Reload(const v1::ServerConfig& file) {
  absl::StatusOr<ExportRegistry::ReloadResult> r =
      registry_->ApplyFile(file, absl::Now() + absl::Seconds(30));
  if (!r.ok()) return r.status();
  // Settings other than the exports are read once, at start-up.
  v1::ServerConfig a = file, b = startup_file_;
  a.clear_exports();
  b.clear_exports();
  ApplyDefaults(&a);
  ApplyDefaults(&b);
  if (!google::protobuf::util::MessageDifferencer::Equals(a, b)) {
    LogWarning("config_reload_needs_restart",
               {{"reason",
                 "only exports are reloaded; other settings changed in the "
                 "file apply at the next start"}});
  }
  LogInfo("config_reloaded", {{"added", absl::StrJoin(r->added, ",")},
                              {"removed", absl::StrJoin(r->removed, ",")},
                              {"updated", absl::StrJoin(r->updated, ",")},
                              {"replaced", absl::StrJoin(r->replaced, ",")},
                              {"unchanged", uint64_t{r->unchanged}},
                              {"exports", uint64_t{registry_->size()}}});
  return absl::OkStatus();
}

void BlockMetaServer::SetStartupFile(v1::ServerConfig file) {
  startup_file_ = std::move(file);
}

BlockMetaServer::~BlockMetaServer() {
  Shutdown(absl::ZeroDuration());
  // Exports go before the services and the cache their hooks use.
  if (registry_ != nullptr)
    registry_->RemoveAll(absl::Now() + absl::Seconds(30));
  registry_.reset();
}

absl::Status BlockMetaServer::Start() {
  const v1::ServerConfig& c = config_;
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
      MakeCredentials(c.tls());
  if (!creds.ok()) return creds.status();

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // One instance per address: without SO_REUSEPORT (gRPC sets it by
  // default) a second server on the same port fails to bind instead of
  // sharing the port's calls with the first.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (!c.grpc_listen().empty()) {
    builder.AddListeningPort(c.grpc_listen(), *creds, &grpc_port_);
  }
  // Unix sockets: gRPC binds private names; they are published at their
  // paths after BuildAndStart, never replacing a live server's socket.
  std::vector<std::pair<std::string, std::string>> unix_paths;  // bound, path
  if (!c.grpc_unix_socket().empty()) {
    unix_paths.emplace_back(PrivateBindPath(c.grpc_unix_socket()),
                            c.grpc_unix_socket());
    // The Unix socket is plaintext even when TCP uses TLS: it is reached
    // only by local processes that can open the socket file (a pod's shared
    // emptyDir, a service user's runtime directory), and kubelet exec
    // probes and sidecars use it without certificates.
    builder.AddListeningPort(absl::StrCat("unix:", unix_paths.back().first),
                             grpc::InsecureServerCredentials());
  }
  if (!c.csi().socket().empty()) {
    // The CSI driver socket (external-snapshot-metadata --csi-address).
    std::string path = *CsiSocketPath(c.csi().socket());  // checked in Create
    unix_paths.emplace_back(PrivateBindPath(path), path);
    builder.AddListeningPort(absl::StrCat("unix:", unix_paths.back().first),
                             grpc::InsecureServerCredentials());
  }
  for (const auto& [bound, path] : unix_paths) {
    if (bound.size() > MaxUnixSocketPath()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Unix socket path \"", path, "\" is too long (its directory plus ",
          bound.size() - path.size() + 1, " bytes must fit in ",
          MaxUnixSocketPath(), ")"));
    }
  }
  builder.RegisterService(grpc_service_.get());
  builder.RegisterService(csi_identity_.get());
  builder.RegisterService(csi_service_.get());
  builder.RegisterService(admin_grpc_.get());
  // Our own health service (health_grpc.h), not gRPC's built-in one, which
  // cannot forget a removed export's name.
  builder.SetOption(
      std::make_unique<grpc::HealthCheckServiceServerBuilderOption>(nullptr));
  builder.RegisterService(health_.get());
  builder.SetMaxReceiveMessageSize(
      static_cast<int>(c.grpc().max_message_bytes()));
  builder.SetMaxSendMessageSize(static_cast<int>(c.grpc().max_message_bytes()));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             static_cast<int>(c.grpc().keepalive_time_ms()));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             static_cast<int>(c.grpc().keepalive_timeout_ms()));
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  if (c.grpc().max_connection_idle_ms() != 0) {
    builder.AddChannelArgument(
        GRPC_ARG_MAX_CONNECTION_IDLE_MS,
        static_cast<int>(c.grpc().max_connection_idle_ms()));
  }
  std::vector<
      std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      interceptors;
  interceptors.push_back(metrics_->InterceptorFactory());
  interceptors.push_back(RequestLogInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr) {
    for (const auto& [bound, path] : unix_paths) ::unlink(bound.c_str());
    if (!c.grpc_listen().empty()) {
      if (std::string why = TcpBindError(c.grpc_listen()); !why.empty()) {
        return absl::UnavailableError(absl::StrCat(
            "cannot listen for gRPC on \"", c.grpc_listen(), "\": ", why));
      }
    }
    return absl::UnavailableError(absl::StrCat(
        "cannot listen for gRPC on \"", c.grpc_listen(), "\"",
        c.grpc_unix_socket().empty()
            ? ""
            : absl::StrCat(" / unix:", c.grpc_unix_socket()),
        " (address in use by another server, bad address, or bad TLS "
        "files?)"));
  }
  if (!c.grpc_listen().empty() && grpc_port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot bind gRPC address \"", c.grpc_listen(), "\""));
  }
  for (size_t i = 0; i < unix_paths.size(); ++i) {
    const auto& [bound, path] = unix_paths[i];
    absl::StatusOr<std::unique_ptr<OwnedUnixSocket>> owned =
        OwnedUnixSocket::Publish(bound, path);
    if (!owned.ok()) {
      for (size_t j = i + 1; j < unix_paths.size(); ++j) {
        ::unlink(unix_paths[j].first.c_str());
      }
      return owned.status();
    }
    unix_sockets_.push_back(*std::move(owned));
  }
  if (!c.metrics_listen().empty()) {
    absl::StatusOr<int> port = metrics_->Serve(c.metrics_listen());
    if (!port.ok()) return port.status();
    metrics_port_ = *port;
  }
  if (nbd_ != nullptr) {
    absl::StatusOr<int> port = nbd_->Start(c.nbd_listen(), c.nbd_unix_socket());
    if (!port.ok()) return port.status();
    nbd_port_ = *port;
  }
  {
    sync::MutexLock lock(&mu_);
    serving_ = true;
  }
  export_health_->CountCurrentExports();  // the start-up set
  health_thread_ = std::thread([this] { HealthLoop(); });
  return absl::OkStatus();
}

void BlockMetaServer::HealthLoop() {
  // Readiness changes without a call (connections drop and come back):
  // re-evaluate what Watch streams see. Check always asks afresh.
  do {
    // Lets an export that connected since the last tick join the aggregate
    // even when nobody asked in between.
    (void)export_health_->Status(kBlockMetaHealthService);
    health_->Refresh();
  } while (
      !stop_health_.WaitForNotificationWithTimeout(absl::Milliseconds(500)));
}

void BlockMetaServer::Shutdown(absl::Duration grace) {
  {
    sync::MutexLock lock(&mu_);
    if (!serving_) return;
    serving_ = false;
  }
  stop_health_.Notify();
  if (health_thread_.joinable()) health_thread_.join();
  health_->Shutdown();  // every service NOT_SERVING; Watch streams end
  if (nbd_ != nullptr) nbd_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() +
                    absl::ToChronoMilliseconds(grace));
  server_->Wait();
  unix_sockets_.clear();  // removes each path that is still ours
}

}  // namespace blockmeta
