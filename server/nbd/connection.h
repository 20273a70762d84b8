// server/nbd/connection.h — one NBD client connection of the shim.
//
// Serve() runs the whole session on the calling thread: the handshake
// (bounded by the handshake timeout), then the transmission phase, where
// that thread is the reader (parse, validate, read WRITE payloads) and a
// small set of worker threads handles requests, so replies may be sent out
// of order. Replies are serialized by a writer mutex, each written whole.
//
// Lifetime: Serve() returns only after the client left (DISC, EOF, error,
// bad magic, Stop()) and every worker has finished its request; nothing is
// left running and the socket is closed by the destructor. A client that
// hangs up mid-request or mid-pipeline only makes the remaining replies
// fail to send. In-flight work per connection is bounded
// (max_inflight_requests, max_inflight_bytes), so a fast client cannot
// queue unbounded memory.
//
// Thread-safety: Serve() is called once, from one thread; Stop() may be
// called from any thread at any time.
#ifndef BLOCKMETA_SERVER_NBD_CONNECTION_H_
#define BLOCKMETA_SERVER_NBD_CONNECTION_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/cache/extent_cache.h"
#include "server/common/mutex.h"
#include "server/nbd/handshake.h"
#include "server/nbd/request.h"
#include "server/nbd/stream.h"

namespace blockmeta {
namespace nbd {

struct ConnectionOptions {
  HandshakeOptions handshake;
  absl::Duration handshake_timeout = absl::Seconds(10);
  size_t workers = 4;
  size_t max_inflight_requests = 16;
  uint64_t max_inflight_bytes = 64u << 20;
};

class Connection {
 public:
  // Takes ownership of `fd`. `exports` (sorted by name) and `cache` must
  // outlive the connection.
  Connection(int fd, const std::vector<ShimExport>* exports, ExtentCache* cache,
             ConnectionOptions options);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  void Serve();
  // Ends the session soon: shuts the socket down so blocked reads and
  // writes return. Idempotent.
  void Stop();
  // The export the client entered; nullptr while negotiating (or if the
  // handshake failed). Points into `exports`.
  const ShimExport* entered() const { return entered_.load(); }

 private:
  struct Job {
    Request request;
    std::string payload;
  };
  void ReaderLoop(const Negotiated& n);
  void WorkerLoop(const Negotiated& n);
  void Send(const std::string& reply) ABSL_LOCKS_EXCLUDED(write_mu_);

  // Constant after construction.
  const int fd_;
  const std::vector<ShimExport>* const exports_;
  ExtentCache* const cache_;
  const ConnectionOptions options_;
  FdStream stream_;

  sync::Mutex mu_;  // protects the job queue
  // Signalled when a job is queued or finished, or the reader stops.
  absl::CondVar changed_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  size_t inflight_ ABSL_GUARDED_BY(mu_) = 0;  // queued + running
  uint64_t inflight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool reader_done_ ABSL_GUARDED_BY(mu_) = false;

  std::atomic<const ShimExport*> entered_{nullptr};

  sync::Mutex write_mu_;  // serializes replies on the socket
  bool broken_ ABSL_GUARDED_BY(write_mu_) = false;
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_CONNECTION_H_
