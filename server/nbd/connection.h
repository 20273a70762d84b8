// server/nbd/connection.h — one NBD client connection of the shim.
//
// Serve() runs the whole session on the calling thread, the connection's
// only thread: the handshake (every read and write bounded by the
// handshake deadline, whatever it waits for), then the transmission loop.
// That loop poll()s the socket and does two things that never wait for
// each other:
// * Receiving: requests are read without blocking, a piece at a time, into
//   the request being received (header, then WRITE payload), so a client
//   that pauses mid-payload to read a pending reply gets it (the NBD
//   project's nbd-tester-client large-request test does this).
// * Answering: a complete request is parsed and validated; a BLOCK_STATUS
//   the cache answers whole (RequestHandler::AnswerFromCache) is answered
//   right here, with no hand-off; other BLOCK_STATUS go to the server's
//   shared WorkerPool (they may wait for the cache); data commands (READ,
//   WRITE, TRIM, WRITE_ZEROES, FLUSH, CACHE) are started on the upstream's
//   asynchronous API (RequestHandler::Start) and their completion, on an
//   upstream engine thread, queues the reply.
// So a session costs one thread, not one per request, and no thread waits
// for a data command. Replies are written without blocking by whoever
// queued them; what the socket does not take waits in the reply queue and
// the loop finishes it when the socket is writable. One writer at a time
// holds the write side (`writing_`); the queue's lock is held only to push,
// pop and account, never across a write.
//
// Limits (what each protects):
// * A queued reply not fully written within `write_timeout` of reaching
//   the queue's front ends the session: a client that stops reading cannot
//   hold the session, its memory or a thread forever.
// * Bytes of requests being handled plus replies not yet written count
//   against `max_inflight_bytes` (per connection) and the server-wide
//   ByteBudget; past either, or past `max_inflight_requests`, the loop
//   stops reading this client (backpressure: TCP then stops the sender).
//   One request is always admitted, so a session never deadlocks.
// * A request whose first byte arrived must arrive whole (payload too)
//   within `write_timeout`.
// * A finished session with nothing in flight for `idle_timeout` ends.
// * After NBD_CMD_DISC (or EOF) no more requests are read; the replies of
//   requests in flight are still sent, by the same loop, under the same
//   write timeout, and Stop() ends that drain at once.
//
// For the server's connection cap, IdleSince() and StalledSince() say,
// without taking any lock, since when the session has been idle and since
// when its queued replies have not moved (the client stopped reading).
//
// Exports: the handshake reads an export's upstream only through Gate(),
// which records the entered export before the final GO / EXPORT_NAME reply
// under entry_mu_; CloseExport() takes the same lock, so an export being
// removed is either refused to this client or its session is stopped,
// never missed (and never read after it went). A session holds its
// export's upstream (a shared_ptr taken in Gate) until it ends; removing
// the export closes the upstream, so what the session waits for fails at
// once and the session ends without waiting for the server.
//
// Lifetime: Serve() returns only after the client left (DISC, EOF, error,
// bad magic, a timeout, Stop()) and every request handed to the pool or
// started on the upstream has finished (its completion queued its reply
// and gave up the write side, under mu_, as its last use of the
// connection); the socket is closed by the destructor. A client that hangs
// up mid-request or mid-pipeline only makes the remaining replies be
// dropped.
//
// Thread-safety: Serve() is called once, from one thread; Stop() and the
// state accessors may be called from any thread at any time.
#ifndef BLOCKMETA_SERVER_NBD_CONNECTION_H_
#define BLOCKMETA_SERVER_NBD_CONNECTION_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/cache/extent_cache.h"
#include "server/common/mutex.h"
#include "server/common/tls_credentials.h"
#include "server/common/worker_pool.h"
#include "server/nbd/handler.h"
#include "server/nbd/handshake.h"
#include "server/nbd/request.h"
#include "server/nbd/stream.h"
#include "server/nbd/tls_stream.h"

namespace blockmeta {
namespace nbd {

// Bytes of replies waiting for slow readers (and requests being handled),
// summed over every connection of a server.
struct ByteBudget {
  explicit ByteBudget(uint64_t limit_bytes) : limit(limit_bytes) {}
  const uint64_t limit;
  std::atomic<uint64_t> used{0};
};

struct ConnectionOptions {
  HandshakeOptions handshake;
  absl::Duration handshake_timeout = absl::Seconds(10);
  // Finished sessions with nothing in flight end after this.
  absl::Duration idle_timeout = absl::InfiniteDuration();
  // Deadline of every reply write and of reading one whole request.
  absl::Duration write_timeout = absl::Seconds(30);
  size_t max_inflight_requests = 16;
  uint64_t max_inflight_bytes = 64u << 20;
  // STARTTLS (with handshake.tls != kOff); not owned, outlives the server.
  TlsCredentials* tls = nullptr;
  bool tls_verify_client = false;       // a client CA is configured
  bool tls_require_client_cert = true;  // with it: refuse clients without
};

class Connection {
 public:
  enum class Phase { kHandshake, kTransmission, kDone };

  // Takes ownership of `fd`. `exports` (sorted by name), `cache`, `pool`
  // and `budget` must outlive the connection.
  Connection(int fd, const std::vector<ShimExport>* exports, ExtentCache* cache,
             WorkerPool* pool, ByteBudget* budget, ConnectionOptions options);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  void Serve();
  // Ends the session soon: shuts the socket down so blocked reads and
  // writes return. Idempotent.
  void Stop();
  // The export the client entered; nullptr while negotiating (or if the
  // handshake failed). Points into `exports`. Recorded before the final
  // reply of the handshake is sent.
  const ShimExport* entered() const { return entered_.load(); }
  // Export `name` is going away: a session that entered it is stopped
  // (returns true: wait for it); a connection still negotiating refuses
  // it from now on, as if unknown, and never again reads its upstream; any
  // other session is untouched. Atomic with respect to entering.
  bool CloseExport(const std::string& name) ABSL_LOCKS_EXCLUDED(entry_mu_);

  Phase phase() const { return phase_.load(); }
  absl::Time started() const { return started_; }
  // Since when the session has been idle: in transmission, no request
  // being received, handled or answered. InfiniteFuture while it is not
  // (negotiating, busy, or done). For eviction at the connection cap.
  // Lock-free.
  absl::Time IdleSince() const;
  // Since when replies have been queued without a byte of them being taken
  // by the client (it stopped reading: pipelined without reading, or sent
  // DISC and stopped); InfiniteFuture when no reply waits or the session
  // is done. Lock-free.
  absl::Time StalledSince() const;

 private:
  struct Pending {
    Reply bytes;
    size_t written = 0;
    uint64_t charged = 0;  // released when written (or dropped)
  };
  // The request being received (loop thread only).
  struct Incoming {
    bool started = false;  // its first byte arrived
    absl::Time deadline;   // it must be whole by then
    size_t header_got = 0;
    uint8_t header[kRequestHeaderSize];
    bool parsed = false;  // header complete, validated
    Request request;
    Verdict verdict;
    std::string payload;  // WRITE data kept (unless discarded)
    uint64_t payload_got = 0;
  };
  enum class Rx { kAgain, kStop };
  // The transmission loop; returns why it ended.
  std::string Loop() ABSL_LOCKS_EXCLUDED(mu_);
  // Reads what the socket has without blocking and acts on every complete
  // request, while requests are admitted. kStop: no more requests (DISC,
  // EOF, bad input; `why` says which).
  Rx Receive(std::string* why) ABSL_LOCKS_EXCLUDED(mu_);
  // Moves up to n bytes of input to `dst` (nullptr: drops them), from the
  // input buffer, else the socket; 0 when nothing is available now.
  absl::StatusOr<size_t> Pull(char* dst, size_t n);
  // A complete, validated request: error reply, inline hit, pool or
  // upstream.
  void Dispatch(const Request& r, const Verdict& v, std::string payload)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Queues a reply; `charged` bytes were charged for its request;
  // `handled`: it comes from a hand-off (pool task or upstream completion)
  // that counted in running_. `from_loop`: called by the loop itself.
  void QueueReply(Reply reply, uint64_t charged, bool handled, bool from_loop)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The holder of the write side writes queued replies until the socket
  // is full or the queue empty, then gives the write side up; mu_ is
  // released around each write.
  void WriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The last step of QueueReply (and of a loop flush): wakes the loop if it
  // must learn about output or freed budget; a hand-off's last use.
  void FinishLocked(bool handled, bool from_loop)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseLocked(uint64_t charged) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool CanAdmitLocked(uint64_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishIdleLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Wake();
  // The handshake's ExportGateFn (see handshake.h).
  absl::StatusOr<UpstreamInfo> Gate(const ShimExport& e, bool enter)
      ABSL_LOCKS_EXCLUDED(entry_mu_);

  // Constant after construction.
  const int fd_;
  const std::vector<ShimExport>* const exports_;
  ExtentCache* const cache_;
  WorkerPool* const pool_;
  ByteBudget* const budget_;
  const ConnectionOptions options_;
  const absl::Time started_;
  int wake_fd_ = -1;  // eventfd: the loop polls it
  FdStream stream_;
  std::atomic<Phase> phase_{Phase::kHandshake};

  // Set once the handshake succeeded, then constant (read by workers).
  std::optional<Negotiated> negotiated_;
  std::optional<RequestHandler> handler_;
  std::unique_ptr<TlsStream> tls_;  // after STARTTLS; before stream_ dies
  ByteStream* io_ = &stream_;       // the transmission stream

  // The loop thread's own (receiving).
  Incoming in_;
  std::unique_ptr<char[]> inbuf_;  // bytes read ahead of the request
  size_t inbuf_pos_ = 0, inbuf_end_ = 0;
  bool rx_drained_ = false;  // a short read emptied the socket: poll first
  bool rx_blocked_ = false;  // stopped for admission with input buffered

  mutable sync::Mutex mu_;
  absl::CondVar changed_;  // signalled when a hand-off finished
  // Replies not fully written, in order. The front one belongs to the
  // writer (writing_) while it writes it without mu_: only the writer pops
  // and nobody else touches the front (deque references survive pushes).
  std::deque<Pending> out_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;    // someone holds the write side
  absl::Time front_since_ ABSL_GUARDED_BY(mu_);  // when out_.front() got there
  size_t inflight_ ABSL_GUARDED_BY(mu_) = 0;     // admitted, reply not written
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;      // handed off, not finished
  uint64_t inflight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_activity_ ABSL_GUARDED_BY(mu_);
  bool broken_ ABSL_GUARDED_BY(mu_) = false;  // socket failed: drop replies
  bool loop_wants_wake_ ABSL_GUARDED_BY(mu_) = false;
  // Published for the server's cap (written under mu_ or by the loop, read
  // lock-free): a request's bytes are being received; since when idle /
  // since when queued replies have not moved (ns since the epoch; kNever).
  std::atomic<bool> receiving_{false};
  std::atomic<int64_t> idle_since_ns_;
  std::atomic<int64_t> stalled_since_ns_;

  // Entering an export and closing one are serialized by entry_mu_;
  // entered_ is also read without it (entered()).
  sync::Mutex entry_mu_;
  std::vector<std::string> closed_exports_ ABSL_GUARDED_BY(entry_mu_);
  // The entered export's upstream, held from entering until the session
  // ended (ShimExport::upstream is only a weak reference).
  std::shared_ptr<Upstream> upstream_ ABSL_GUARDED_BY(entry_mu_);
  std::atomic<const ShimExport*> entered_{nullptr};
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_CONNECTION_H_
