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
// the server advertises multi-conn or the export is read-only. Every handle
// carries many commands at once (libnbd's aio API; NBD allows any number in
// flight, answered in any order); a command goes to the live handle with the
// fewest in flight. Handles are driven by the process-wide NbdEngine (two
// epoll driver threads and one timer thread for ALL upstreams, see
// nbd_engine.h): no thread per upstream or per handle.
//
// Deadlines: the Async* forms carry none; each command is bounded by the
// export's upstream_timeout_ms, checked every 100 ms. A command older than
// that closes its handle (libnbd cannot cancel one command): its callers
// get DEADLINE_EXCEEDED, the other commands on that handle UNAVAILABLE, and
// the handle is reconnected. The synchronous forms wait on the async ones
// until the caller's deadline; when that passes first the caller gets
// DEADLINE_EXCEEDED and the command runs on, costing neither the handle nor
// the generation (with a finite deadline, Pread/Pwrite copy through a
// buffer the command owns, since the caller's may be gone when it ends).
//
// Block status: one request per call, for min(length, size - offset,
// 4 GiB - 1 MiB) bytes (the NBD 32-bit limit rounded down to 1 MiB: nbdkit
// 1.32 aborts on a 0xffffffff request), no REQ_ONE; the reply for the asked
// context is validated (one chunk, nonzero lengths) and clipped to the size;
// it may end before or after offset + length. Malformed replies: INTERNAL.
// Reads/writes above the maximum block size and trims/zeroes/caches above
// 2 GiB are split, all pieces in flight at once (chunked.h).
//
// Health, watched all the time: EOF or a half-closed socket on a handle,
// idle or busy, closes it at once (the engine waits for EPOLLRDHUP); an
// ESHUTDOWN reply starts a soft disconnect (NBD_CMD_DISC, as the NBD spec
// requires; closed after 1 s at most); a handle idle for 700 ms gets a
// small read (a health probe), because a server shutting down may keep idle
// connections open and only answer ESHUTDOWN. Such a handle leaves the pool
// at once; Ready() is false once none is left.
//
// Failures and generations: while no handle is up every call fails at once
// with UNAVAILABLE and LastError(). Reconnects run on the engine's timer
// with jittered exponential backoff (100 ms doubling to 5 s; the first
// attempt after a loss is immediate), restarting a spawned server that
// exited. NBD offers no way to prove that a new connection serves the same
// image as the old one (equal size is no proof), so Generation() increases
// (a) on every reconnect round that brings a handle up, and (b) when the
// last live handle is lost (during an outage the image may change behind
// our back). The first connection moves it from 0 to 1; filling the pool
// after it is not a reconnect. The OnGenerationChange callback runs on the
// timer thread after each increase (possibly coalescing several).
//
// Close (the export was removed): reconnects stop and every handle is
// closed at once; commands in flight complete then with Close's reason,
// whatever the server answers later; later calls fail with it. It never
// waits for the server. The spawned server is stopped by the destructor.
//
// Thread-safety: all public methods are thread-safe. No lock is held
// during upstream I/O. Completions run on a driver thread (or on the
// caller's thread when the command could not be sent); they must not
// block. The object must outlive all calls into it; the destructor closes
// every handle (commands still in flight complete with UNAVAILABLE before
// it returns) and stops a spawned server.
//
// Cost: a command costs one NBD round trip, two short mutex sections and
// one allocation; the engine's threads are shared by every upstream.
//
// Code: this file's factory (nbd_upstream.cc) makes an NbdUpstream
// (nbd_upstream_impl.h, the facade) over a Core (nbd_core.h, the pool) of
// Conns (nbd_conn.h, one handle each) carrying Ops (nbd_op.h, one command
// each); those are private to server/upstream.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "server/upstream/upstream.h"
#include "server/upstream/upstream_config.h"  // IWYU pragma: export

namespace blockmeta {

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
// The Unix socket the spawned server listens on, "" when none.
std::string SpawnedServerSocketForTesting(Upstream* upstream);
// Number of handles currently up.
int LiveConnectionsForTesting(Upstream* upstream);

// Threads the shared upstream engine runs for the whole process (drivers
// plus timer), however many upstreams exist.
int UpstreamEngineThreads();

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_H_
