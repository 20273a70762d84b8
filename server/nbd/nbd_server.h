// server/nbd/nbd_server.h — the NBD shim's listener: serves every
// configured export to legacy NBD clients on TCP and/or a Unix socket.
//
// Each accepted client becomes a Connection run on its own thread; every
// connection's requests are handled by one shared WorkerPool
// (NbdShimConfig.worker_threads, default 16), so threads grow by one per
// connection. A client must finish its handshake within
// handshake_timeout_ms (default 10 s), reads and writes alike. When
// NbdShimConfig.max_connections (default 100) are open, a new client stops
// the oldest connection still in its handshake; failing that, the
// established session idle the longest, if idle for at least
// idle_eviction_grace_ms (default 5 s; sessions with requests in flight
// are never evicted; no_idle_eviction turns it off); failing that, it is
// closed at once. Stopped connections count until their thread ends; at
// twice the cap the server stops accepting until one does, so new clients
// wait in the listen backlog in arrival order rather than being refused
// while hostile ones reconnect. So idle, flooding or half-open clients
// cannot keep good clients out (qemu CVE-2024-7409), not even after
// finishing the handshake. Reply bytes waiting
// on slow readers are bounded per connection and server-wide
// (max_inflight_bytes). No upstream work is done for a client before it
// has entered transmission.
//
// Lifetime: Start() once, Shutdown() (or the destructor) once; Shutdown
// stops accepting, ends every session (in-flight requests finish, bounded
// by the upstream timeout) and joins every thread. The cache must outlive
// the server. Exports' upstreams are weak references (ShimExport); a
// session holds its export's upstream until it ends.
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_NBD_NBD_SERVER_H_
#define BLOCKMETA_SERVER_NBD_NBD_SERVER_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/cache/extent_cache.h"
#include "server/common/mutex.h"
#include "server/common/tls_credentials.h"
#include "server/common/unix_socket.h"
#include "server/common/worker_pool.h"
#include "server/nbd/connection.h"
#include "server/nbd/handshake.h"

namespace blockmeta {

// `nbd` with its TLS files defaulted to the gRPC listener's (`tls`) when it
// names none of its own.
blockmeta::v1::NbdShimConfig WithDefaultTlsFiles(
    blockmeta::v1::NbdShimConfig nbd, const blockmeta::v1::TlsConfig& tls);

// Defaults of the NbdShimConfig fields the listener reads (0 = default).
// The per-connection ones live in nbd::ConnectionOptions /
// nbd::HandshakeOptions, the invalidation granularity in handshake.h.
struct NbdServerDefaults {
  static constexpr uint32_t kMaxConnections = 100;
  static constexpr uint32_t kWorkerThreads = 16;
  static constexpr uint64_t kMaxInflightBytes = 1ull << 30;
  static constexpr uint32_t kIdleEvictionGraceMs = 5000;
};

// The floor writes through the shim are rounded out to before the cache
// rounds them further per context (ExtentCache::InvalidateExportRange), for
// one export (a power of two): the upstream's learned
// Upstream::ChangeGranularity() (at least 64 KiB, and at least
// nbd.invalidate_granularity_bytes when that is set), else the configured
// value (default 2 MiB); never below the upstream's advertised minimum or
// preferred block size.
uint64_t ExportInvalidateGranularity(const blockmeta::v1::NbdShimConfig& c,
                                     const nbd::ShimExport& e);

class NbdServer {
 public:
  // Serves the given exports (sorted here; SetExports changes them).
  NbdServer(std::vector<nbd::ShimExport> exports, ExtentCache* cache,
            const blockmeta::v1::NbdShimConfig& config);
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Listens on `tcp_addr` ("host:port", port 0 picks one; "" = none) and/or
  // `unix_path` ("" = none). Returns the bound TCP port (0 without TCP).
  // INVALID_ARGUMENT for a bad nbd.tls mode or unreadable TLS files.
  absl::StatusOr<int> Start(const std::string& tcp_addr,
                            const std::string& unix_path);
  void Shutdown();

  // Exports at run time: the list new connections negotiate against (a
  // connection keeps the list it was accepted with; sorted here).
  void SetExports(std::vector<nbd::ShimExport> exports)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Ends every session that entered `name` and waits (up to `wait`, which
  // may be zero) for them to finish; connections still negotiating refuse
  // `name` from now on (NBD_REP_ERR_UNKNOWN) and never read its upstream
  // again; sessions in other exports are untouched. Entering is recorded
  // before the final handshake reply, atomically with this, so a session
  // about to enter `name` is either refused or closed, never missed. A
  // session holds the upstream until it ends, so nobody has to wait for
  // that. Returns how many sessions were closed.
  size_t CloseExport(const std::string& name, absl::Duration wait)
      ABSL_LOCKS_EXCLUDED(mu_);

  size_t ActiveConnections() const { return active_.load(); }
  uint64_t RejectedConnections() const { return rejected_.load(); }
  // Bytes of requests being handled and replies not yet sent, all
  // connections.
  uint64_t BufferedBytes() const { return budget_.used.load(); }
  // Clients stopped in their handshake to make room for a new one.
  uint64_t EvictedConnections() const { return evicted_.load(); }
  // Established sessions stopped, idle, to make room for a new client.
  uint64_t EvictedIdleSessions() const { return evicted_idle_.load(); }

 private:
  using ExportList = std::vector<nbd::ShimExport>;
  struct Slot {
    std::shared_ptr<const ExportList> exports;  // what it negotiates against
    std::unique_ptr<nbd::Connection> connection;
    std::thread thread;
    std::atomic<bool> done{false};
    bool evicted = false;  // guarded by mu_
  };
  void AcceptLoop();
  void OnAccept(int fd);
  void ReapLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction (options_.tls: after Start()).
  ExtentCache* const cache_;
  const blockmeta::v1::NbdShimConfig config_;
  nbd::ConnectionOptions options_;
  std::unique_ptr<TlsCredentials> tls_;
  size_t max_connections_;
  // Established sessions idle this long may be evicted at the cap
  // (InfiniteDuration: never).
  absl::Duration idle_eviction_grace_;
  WorkerPool pool_;  // handles every connection's requests
  nbd::ByteBudget budget_;

  // Set by Start(), read by the accept thread, cleared by Shutdown().
  int tcp_fd_ = -1;
  int unix_fd_ = -1;
  int wake_[2] = {-1, -1};
  // The published Unix socket file; removed at Shutdown() if still ours.
  std::unique_ptr<OwnedUnixSocket> unix_socket_;
  std::thread acceptor_;

  sync::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::list<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const ExportList> exports_ ABSL_GUARDED_BY(mu_);

  std::atomic<size_t> active_{0};
  std::atomic<uint64_t> rejected_{0};
  std::atomic<uint64_t> evicted_{0};
  std::atomic<uint64_t> evicted_idle_{0};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_NBD_SERVER_H_
