// server/nbd/nbd_server.h — the NBD shim's listener: serves every
// configured export to legacy NBD clients on TCP and/or a Unix socket.
//
// Each accepted client becomes a Connection run on its own thread; every
// connection's BLOCK_STATUS misses are handled by one shared WorkerPool
// (NbdShimConfig.worker_threads, default 16), so threads grow by one per
// connection. A client must finish its handshake within
// handshake_timeout_ms (default 10 s), reads and writes alike.
//
// The connection cap (NbdShimConfig.max_connections, default 100): when it
// is full, a new client makes room by stopping, in this order,
// 1. the session stalled the longest: replies queued that the client has
//    not taken a byte of for stall_eviction_grace_ms (default 250 ms), e.g.
//    it pipelined reads and never reads the replies, or sent NBD_CMD_DISC
//    and stopped reading. Progress, not activity, decides who is stuck;
// 2. the oldest connection still in its handshake;
// 3. the established session idle the longest, if idle at least
//    idle_eviction_grace_ms (default 500 ms; no_idle_eviction turns this
//    one off). Sessions receiving a request, or whose requests are still
//    at the upstream, are never evicted.
// When nobody can make room yet, the new client waits (accepted, not yet
// greeted) up to admission_wait_ms (default 1 s) for someone to become
// evictable or leave; then it is refused politely (refusal.h: greeting,
// NBD_REP_ERR_SHUTDOWN to its options), never with a bare EOF, unless 64
// refusals are already under way. Stopped connections count until their
// thread ends; at twice the cap the server stops accepting until one does,
// so new clients wait in the listen backlog in arrival order rather than
// being refused while hostile ones reconnect. So idle, flooding,
// half-open or non-reading clients cannot keep good clients out (qemu
// CVE-2024-7409), not even after finishing the handshake. The acceptor
// decides all of this from lock-free session state (Connection::IdleSince,
// StalledSince) read outside the server's lock, and never waits on a
// session (it joins only threads that have finished). Reply bytes waiting
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
#include <deque>
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
#include "server/nbd/refusal.h"

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
  static constexpr uint32_t kIdleEvictionGraceMs = 500;
  static constexpr uint32_t kStallEvictionGraceMs = 250;
  static constexpr uint32_t kAdmissionWaitMs = 1000;
  // Refusal handshakes under way at once (more: closed at once), and how
  // long one may take.
  static constexpr size_t kMaxRefusing = 64;
  static constexpr uint32_t kRefusalMs = 2000;
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
  // Sessions stopped whose replies had stalled (client not reading).
  uint64_t EvictedStalledSessions() const { return evicted_stalled_.load(); }

 private:
  using ExportList = std::vector<nbd::ShimExport>;
  struct Slot {
    std::shared_ptr<const ExportList> exports;  // what it negotiates against
    std::unique_ptr<nbd::Connection> connection;
    std::thread thread;  // set and joined by the acceptor (or Shutdown)
    std::atomic<bool> done{false};
    std::atomic<bool> evicted{false};
  };
  using SlotRef = std::shared_ptr<Slot>;
  // A client accepted at the full cap, waiting for room.
  struct Waiting {
    int fd;
    absl::Time since;
  };
  // A client being refused (refusal.h), bounded in time.
  struct Refusing {
    int fd;
    absl::Time deadline;
    std::unique_ptr<nbd::Refusal> refusal;
    bool closing = false;  // our side is shut: drain until EOF, then close
  };
  void AcceptLoop();
  // Starts waiting clients while there is room or room can be made.
  void Admit();
  // Stops the best victim at the cap (see the file comment); false if none.
  bool EvictOne(absl::Time now);
  void StartSession(int fd) ABSL_LOCKS_EXCLUDED(mu_);
  void Refuse(int fd);
  // Reads from refusal i; false when it is finished (closed).
  bool ServeRefusal(Refusing& r);
  // Moves finished slots to `out` (joined by the caller, without mu_).
  void ReapLocked(std::vector<SlotRef>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<SlotRef> Snapshot() ABSL_LOCKS_EXCLUDED(mu_);

  // Constant after construction (options_.tls: after Start()).
  ExtentCache* const cache_;
  const blockmeta::v1::NbdShimConfig config_;
  nbd::ConnectionOptions options_;
  std::unique_ptr<TlsCredentials> tls_;
  size_t max_connections_;
  // Established sessions idle this long may be evicted at the cap
  // (InfiniteDuration: never).
  absl::Duration idle_eviction_grace_;
  // Sessions whose queued replies have not moved this long may be evicted.
  absl::Duration stall_eviction_grace_;
  // How long a client at the full cap waits for room before its refusal.
  absl::Duration admission_wait_;
  WorkerPool pool_;  // handles every connection's BLOCK_STATUS misses
  nbd::ByteBudget budget_;

  // Set by Start(), read by the accept thread, cleared by Shutdown().
  int tcp_fd_ = -1;
  int unix_fd_ = -1;
  int wake_[2] = {-1, -1};
  // The published Unix socket file; removed at Shutdown() if still ours.
  std::unique_ptr<OwnedUnixSocket> unix_socket_;
  std::thread acceptor_;

  // The acceptor thread's own.
  std::deque<Waiting> waiting_;
  std::list<Refusing> refusing_;

  sync::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::list<SlotRef> slots_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const ExportList> exports_ ABSL_GUARDED_BY(mu_);

  std::atomic<size_t> active_{0};
  std::atomic<uint64_t> rejected_{0};
  std::atomic<uint64_t> evicted_{0};
  std::atomic<uint64_t> evicted_idle_{0};
  std::atomic<uint64_t> evicted_stalled_{0};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_NBD_SERVER_H_
