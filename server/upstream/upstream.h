// server/upstream/upstream.h — the interface to one export's upstream NBD
// server, as the cache, the services and the NBD shim see it: readiness,
// negotiated info, block status (blocking and asynchronous) and data
// commands with deadlines. How it connects is the implementation's business
// (NbdUpstream, nbd_upstream.h: a pool of libnbd connections to an NBD URI,
// a spawned qemu-nbd or command, reconnecting with backoff; tests use
// FakeUpstream).
//
// Errors (absl::Status codes): UNAVAILABLE when not connected or the
// connection broke (retryable), DEADLINE_EXCEEDED when the caller's deadline
// passed (the command runs on; only one that exceeds the export's own
// upstream timeout costs its connection), FAILED_PRECONDITION for a metadata
// context the upstream did not negotiate, OUT_OF_RANGE / INVALID_ARGUMENT for
// bad ranges, PERMISSION_DENIED for writes to a read-only export, and the NBD
// error mapped from errno for commands the server refused (see
// server/upstream/nbd_errors.h; an NBD EIO from the server is DATA_LOSS).
//
// Thread-safety: every method is thread-safe; concurrent calls share the
// connections of the pool, many commands in flight on each.
#ifndef BLOCKMETA_SERVER_UPSTREAM_UPSTREAM_H_
#define BLOCKMETA_SERVER_UPSTREAM_UPSTREAM_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/cache/extent.h"

namespace blockmeta {

// What the upstream negotiated. Fixed for one connection generation.
struct UpstreamInfo {
  uint64_t size = 0;
  uint32_t minimum_block_size = 1;
  uint32_t preferred_block_size = 4096;
  uint32_t maximum_block_size = 32u << 20;
  // The server sent NBD_INFO_BLOCK_SIZE with a maximum (else
  // maximum_block_size is the default above, not the server's word).
  bool maximum_block_size_advertised = false;
  // Effective: the server said read-only, or the config asks for it.
  bool read_only = false;
  bool can_trim = false;
  bool can_zero = false;
  bool can_fast_zero = false;
  bool can_flush = false;
  bool can_fua = false;
  bool can_multi_conn = false;
  bool can_cache = false;
  // Negotiated metadata contexts, e.g. {"base:allocation",
  // "qemu:dirty-bitmap:b1"}.
  std::vector<std::string> contexts;
  // Human description of where this comes from (no secrets).
  std::string description;
};

// Completions of asynchronous commands (see Upstream::Async*). Each is
// called exactly once: on an engine thread when the upstream answers, or on
// the caller's thread before the Async* call returns when the command
// cannot be issued (not connected, bad range). A completion must not block;
// it may issue further Async* calls.
using StatusCallback = absl::AnyInvocable<void(absl::Status) &&>;
using ExtentsCallback = absl::AnyInvocable<void(absl::StatusOr<ExtentList>) &&>;

// Counters an operator watches (all since the Upstream was created, except
// the in-flight gauges). Only NbdUpstream fills them.
struct UpstreamStats {
  struct Connection {
    uint64_t commands_issued = 0;
    uint64_t commands_in_flight = 0;
    uint64_t max_in_flight = 0;  // the most ever in flight at once
  };
  uint64_t commands_issued = 0;     // NBD commands sent (a split read: many)
  uint64_t commands_in_flight = 0;  // sent, not yet answered
  uint64_t commands_failed = 0;     // answered with an error or lost
  // Commands that exceeded upstream_timeout_ms (their connection was
  // closed), and synchronous callers whose own deadline passed first (the
  // command ran on).
  uint64_t commands_timed_out = 0;
  uint64_t caller_deadlines_passed = 0;
  // Reconnect rounds that brought a connection back after the first
  // connection (a fresh export reports 0), connections lost, and the ones
  // closed gracefully because the server answered ESHUTDOWN.
  uint64_t reconnects = 0;
  uint64_t connections_lost = 0;
  uint64_t soft_disconnects = 0;
  // Small reads sent on idle connections to learn of a server shutting
  // down (not in commands_issued).
  uint64_t health_probes = 0;
  // Exits of a spawned server that found a qcow2 bitmap inconsistent.
  uint64_t bitmap_inconsistent_exits = 0;
  std::vector<Connection> connections;  // the live ones

  // The persistent store (filled by StoreUpstream, server/upstream/
  // store_upstream.h; empty otherwise). Per context: block-status calls
  // answered from disk (hits, never sent upstream), calls sent upstream
  // (misses), answers written through, extents read back, and the calls
  // made to check persisted answers at reopen.
  struct StoreContext {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t writes = 0;
    uint64_t extents_read = 0;
    uint64_t verify_calls = 0;
  };
  std::string store_identity;  // "" when the export does not use the store
  uint64_t store_bytes = 0;
  uint64_t store_verify_failures = 0;
  std::map<std::string, StoreContext> store_contexts;
};

// True while a block-status completion runs that a second tier answered
// without asking the upstream (StoreUpstream sets it around the callback,
// and after a synchronous BlockStatus until the next one on this thread):
// observers that count upstream calls skip those.
inline thread_local bool tls_answered_from_store = false;

// NBD command flags the shim may pass through.
inline constexpr uint32_t kCmdFlagFua = 1u << 0;
inline constexpr uint32_t kCmdFlagNoHole = 1u << 1;
inline constexpr uint32_t kCmdFlagFastZero = 1u << 4;

class Upstream {
 public:
  virtual ~Upstream() = default;

  // True while at least one connection is up.
  virtual bool Ready() const = 0;
  // Blocks until Ready() or `deadline`; returns Ready(). The default polls
  // every 10 ms (for fakes); NbdUpstream waits on its own state.
  virtual bool WaitReady(absl::Time deadline) {
    while (!Ready() && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    return Ready();
  }
  // Last negotiated info; FAILED_PRECONDITION/UNAVAILABLE before the first
  // successful connection.
  virtual absl::StatusOr<UpstreamInfo> Info() const = 0;
  // Learned from the image blockmeta serves, constant: a write may change
  // block status and dirty bitmaps anywhere in the aligned unit of this
  // many bytes around it (qcow2 cluster size, largest bitmap granularity).
  // 0: not known (an upstream given by URI or command, a raw image, a
  // failed probe); callers then use their configured granularity.
  virtual uint64_t ChangeGranularity() const { return 0; }
  // Why the upstream is not ready, if it is not ("" when ready).
  virtual std::string LastError() const = 0;
  // Increases whenever a reconnect produced a connection that cannot be
  // proven to serve the same image; caches must drop what they hold.
  virtual uint64_t Generation() const = 0;
  // Called (from a background thread) after Generation() changes.
  virtual void SetOnGenerationChange(std::function<void()> fn) = 0;
  // Operator counters (see UpstreamStats); zeros for fakes.
  virtual UpstreamStats Stats() const { return {}; }
  // Ends the upstream for good (its export was removed), without waiting
  // for the server: stops reconnecting; every command in flight completes
  // at once with `why` (a late answer from the server is dropped), so every
  // caller waiting for one returns; every later call fails with `why`.
  // Ready() is false from then on. Idempotent. Resources that take time to
  // release (a spawned server) go with the object. The default (fakes)
  // does nothing.
  virtual void Close(const absl::Status& why) { (void)why; }

  // Block status of one negotiated context: extents contiguous from
  // `offset`, at least one, clipped to the export size; may be shorter or
  // longer than `length` (length is capped at kMaxNbdRequestLength).
  virtual absl::StatusOr<ExtentList> BlockStatus(const std::string& context,
                                                 uint64_t offset,
                                                 uint64_t length,
                                                 absl::Time deadline) = 0;

  // Data commands, passed through for the NBD shim.
  virtual absl::Status Pread(void* buf, uint64_t count, uint64_t offset,
                             absl::Time deadline) = 0;
  virtual absl::Status Pwrite(const void* buf, uint64_t count, uint64_t offset,
                              uint32_t flags, absl::Time deadline) = 0;
  virtual absl::Status Trim(uint64_t count, uint64_t offset, uint32_t flags,
                            absl::Time deadline) = 0;
  virtual absl::Status Zero(uint64_t count, uint64_t offset, uint32_t flags,
                            absl::Time deadline) = 0;
  virtual absl::Status Flush(absl::Time deadline) = 0;
  virtual absl::Status Cache(uint64_t count, uint64_t offset,
                             absl::Time deadline) = 0;

  // Asynchronous forms. They carry no caller deadline: the command runs
  // under the export's own upstream timeout, and a caller that stops
  // waiting simply drops interest (the completion still runs). Buffers must
  // stay valid until the completion runs. The defaults run the synchronous
  // form inline (for fakes); NbdUpstream keeps many commands in flight.
  virtual void AsyncBlockStatus(const std::string& context, uint64_t offset,
                                uint64_t length, ExtentsCallback done) {
    std::move(done)(
        BlockStatus(context, offset, length, absl::InfiniteFuture()));
  }
  virtual void AsyncPread(void* buf, uint64_t count, uint64_t offset,
                          StatusCallback done) {
    std::move(done)(Pread(buf, count, offset, absl::InfiniteFuture()));
  }
  virtual void AsyncPwrite(const void* buf, uint64_t count, uint64_t offset,
                           uint32_t flags, StatusCallback done) {
    std::move(done)(Pwrite(buf, count, offset, flags, absl::InfiniteFuture()));
  }
  virtual void AsyncTrim(uint64_t count, uint64_t offset, uint32_t flags,
                         StatusCallback done) {
    std::move(done)(Trim(count, offset, flags, absl::InfiniteFuture()));
  }
  virtual void AsyncZero(uint64_t count, uint64_t offset, uint32_t flags,
                         StatusCallback done) {
    std::move(done)(Zero(count, offset, flags, absl::InfiniteFuture()));
  }
  virtual void AsyncFlush(StatusCallback done) {
    std::move(done)(Flush(absl::InfiniteFuture()));
  }
  virtual void AsyncCache(uint64_t count, uint64_t offset,
                          StatusCallback done) {
    std::move(done)(Cache(count, offset, absl::InfiniteFuture()));
  }
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_UPSTREAM_H_
