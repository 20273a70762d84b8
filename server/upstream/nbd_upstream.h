// server/upstream/nbd_upstream.h — the libnbd implementation of Upstream.
//
// One NbdUpstream per export: a pool of libnbd handles to one NBD server,
// which is either
//   * an NBD URI (nbd://, nbd+unix://, nbds://, ... as libnbd 1.14 accepts),
//   * a local raw/qcow2 image served by a qemu-nbd that we spawn:
//       qemu-nbd -f FORMAT --shared=0 --persistent [--read-only] [-B B]... --
//       PATH
//     (the format is never probed: raw unless ".qcow2" or given), or
//   * a command (e.g. nbdkit memory 1G) that we spawn.
// Spawned servers are started ONCE per upstream by socket activation (see
// spawned_server.h) and every handle connects to their socket; they are
// restarted when they die and killed (SIGTERM, then SIGKILL) and reaped on
// destruction.
//
// Negotiation: option mode; NBD_OPT_LIST_META_CONTEXT with an empty query
// discovers what the server offers; we then request base:allocation plus
// every qemu:dirty-bitmap:* offered, and record the contexts the server
// actually selected (nbd_can_meta_context). Servers that cannot list still
// get base:allocation requested.
//
// Pool: up to config.connections handles (default 2), but only 1 unless
// the server advertises multi-conn or the export is read-only. A libnbd
// handle runs one command at a time here: a call takes an idle handle or
// waits for one until its deadline.
//
// Deadlines: each call's deadline is min(deadline, now+upstream_timeout_ms).
// Commands are issued with the aio API and driven with nbd_poll() in
// slices until the deadline; libnbd cannot cancel a command, so on expiry
// the handle is closed (and reconnected in the background) and the call
// returns DEADLINE_EXCEEDED.
//
// Block status: one request per call, for min(length, size - offset,
// 4 GiB - 1 MiB) bytes (the NBD 32-bit limit rounded down to 1 MiB: nbdkit
// 1.32 aborts on a 0xffffffff request), no REQ_ONE; the reply for the asked
// context is validated (one chunk, nonzero lengths) and clipped to the size;
// it may end before or after offset + length. Malformed replies: INTERNAL.
//
// Failures and generations: when a handle dies (server gone, connection
// reset) the call gets UNAVAILABLE and the handle is dropped; while no
// handle is up every call fails at once with UNAVAILABLE and LastError().
// A background thread reconnects with jittered exponential backoff
// (100 ms doubling to 5 s; the first attempt after a loss is immediate),
// restarting a spawned server that exited. NBD offers no way to prove that
// a new connection serves the same image as the old one (equal size is no
// proof), so Generation() increases (a) on every reconnect round that brings
// a handle up, and (b) when the last live handle is lost (during an outage
// the image may change behind our back). The first connection moves it from
// 0 to 1. The OnGenerationChange callback runs on the background thread
// after each increase (possibly coalescing several increases).
//
// Thread-safety: all public methods are thread-safe. No lock is held
// during upstream I/O. The object must outlive all calls into it; the
// destructor stops the background thread (bounded by ~1 poll slice),
// closes all handles and stops a spawned server.
//
// Cost: one extra thread per upstream; a call costs one NBD round trip plus
// a mutex acquisition to take and return a handle.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_H_

#include <sys/types.h>

#include <memory>

#include "absl/status/statusor.h"
#include "blockmeta/v1/config.pb.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

// Defaults for ExportConfig fields left 0.
inline constexpr uint32_t kDefaultUpstreamConnections = 2;
inline constexpr uint32_t kDefaultUpstreamTimeoutMs = 30000;

// Starts connecting in the background and returns at once. The config is
// assumed valid (ExportRegistry validates it); INVALID_ARGUMENT when no
// upstream kind is set, INTERNAL when a private directory cannot be made.
absl::StatusOr<std::unique_ptr<Upstream>> CreateUpstream(
    const blockmeta::v1::ExportConfig& config);

// The argv used to serve an image upstream (see above), for docs and tests.
std::vector<std::string> QemuNbdArgv(const blockmeta::v1::ImageUpstream& image,
                                     bool read_only);

// The image format used for an ImageUpstream: the given one, else "qcow2"
// for paths ending in ".qcow2", else "raw".
std::string ImageFormat(const blockmeta::v1::ImageUpstream& image);

// Test hooks on an Upstream made by CreateUpstream (nullptr/-1 otherwise).
// The pid of the spawned server, -1 when none runs.
pid_t SpawnedServerPidForTesting(Upstream* upstream);
// Number of handles currently up.
int LiveConnectionsForTesting(Upstream* upstream);

// Threads the shared upstream engine runs for the whole process (drivers
// plus timer), however many upstreams exist.
int UpstreamEngineThreads();

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_H_
