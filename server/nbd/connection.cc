// server/nbd/connection.cc — one NBD session: handshake, reader, workers.
#include "server/nbd/connection.h"

#include <sys/socket.h>
#include <unistd.h>

#include <utility>

#include "server/common/log.h"
#include "server/nbd/handler.h"

namespace blockmeta {
namespace nbd {

Connection::Connection(int fd, const std::vector<ShimExport>* exports,
                       ExtentCache* cache, ConnectionOptions options)
    : fd_(fd),
      exports_(exports),
      cache_(cache),
      options_(options),
      stream_(fd, /*owns=*/true) {}

Connection::~Connection() = default;  // stream_ closes the fd

void Connection::Stop() { shutdown(fd_, SHUT_RDWR); }

void Connection::Send(const std::string& reply) {
  sync::MutexLock lock(&write_mu_);
  if (broken_) return;
  if (!stream_.WriteAll(reply).ok()) {
    broken_ = true;            // the client is gone; later replies are dropped
    shutdown(fd_, SHUT_RDWR);  // and the reader stops too
  }
}

void Connection::Serve() {
  stream_.SetReadDeadline(absl::Now() + options_.handshake_timeout);
  absl::StatusOr<Negotiated> n =
      RunHandshake(stream_, *exports_, options_.handshake);
  if (!n.ok()) {
    LogDebug("nbd_handshake_end", {{"reason", n.status().ToString()}});
    shutdown(fd_, SHUT_RDWR);  // the client sees EOF now, not at reaping
    return;
  }
  stream_.SetReadDeadline(absl::InfiniteFuture());
  entered_.store(n->export_entry);
  LogDebug("nbd_session_start",
           {{"export", n->export_entry->name},
            {"structured", n->structured_replies},
            {"contexts", static_cast<unsigned long>(n->contexts.size())}});
  std::vector<std::thread> workers;
  const size_t count = options_.workers == 0 ? 1 : options_.workers;
  for (size_t i = 0; i < count; ++i) {
    workers.emplace_back([this, &n] { WorkerLoop(*n); });
  }
  ReaderLoop(*n);
  {
    sync::MutexLock lock(&mu_);
    reader_done_ = true;
  }
  changed_.SignalAll();
  for (std::thread& t : workers) t.join();
  shutdown(fd_, SHUT_RDWR);
  LogDebug("nbd_session_end", {{"export", n->export_entry->name}});
}

void Connection::ReaderLoop(const Negotiated& n) {
  for (;;) {
    uint8_t hdr[kRequestHeaderSize];
    if (!stream_.ReadFull(hdr, sizeof hdr).ok()) return;  // client left
    Request r;
    if (!ParseRequestHeader(hdr, &r)) {
      LogWarning("nbd_bad_request_magic", {{"export", n.export_entry->name}});
      return;
    }
    Verdict v = ValidateRequest(r, n);
    if (v.disconnect) {
      if (r.type != kCmdDisc) {
        LogWarning("nbd_request_disconnect",
                   {{"reason", std::string(v.reason)}});
      }
      return;  // DISC: in-flight requests still finish before we close
    }
    std::string payload;
    if (v.payload > 0) {
      if (v.discard_payload) {
        if (!stream_.Discard(v.payload).ok()) return;
      } else {
        payload.resize(v.payload);
        if (!stream_.ReadFull(payload.data(), payload.size()).ok()) return;
      }
    }
    if (v.error != 0) {
      Send(ErrorReply(n.structured_replies, r.handle, v.error, v.reason));
      continue;
    }
    const uint64_t bytes = payload.size() + (r.type == kCmdRead ? r.length : 0);
    {
      sync::MutexLock lock(&mu_);
      // Bounded in-flight work; one request is always admitted.
      while (!(inflight_ == 0 ||
               (inflight_ < options_.max_inflight_requests &&
                inflight_bytes_ + bytes <= options_.max_inflight_bytes))) {
        mu_.WaitWithDeadline(&changed_, absl::InfiniteFuture());
      }
      ++inflight_;
      inflight_bytes_ += bytes;
      queue_.push_back(Job{r, std::move(payload)});
    }
    changed_.SignalAll();
  }
}

void Connection::WorkerLoop(const Negotiated& n) {
  RequestHandler handler(n, cache_);
  for (;;) {
    Job job;
    {
      sync::MutexLock lock(&mu_);
      while (queue_.empty() && !reader_done_) {
        mu_.WaitWithDeadline(&changed_, absl::InfiniteFuture());
      }
      if (queue_.empty()) return;  // reader done and nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    const uint64_t bytes =
        job.payload.size() +
        (job.request.type == kCmdRead ? job.request.length : 0);
    Send(handler.Handle(job.request, std::move(job.payload)));
    {
      sync::MutexLock lock(&mu_);
      --inflight_;
      inflight_bytes_ -= bytes;
    }
    changed_.SignalAll();  // the reader may be waiting for room
  }
}

}  // namespace nbd
}  // namespace blockmeta
