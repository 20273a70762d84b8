// server/nbd/handler.h — executes validated NBD requests: the "handle"
// half of the shim's request path (request.h parses and validates).
//
// BLOCK_STATUS is answered from the shared ExtentCache (key: export name +
// context), whose Fetcher calls Upstream::BlockStatus on a miss; one chunk
// per selected context, descriptors clipped to the request (never past the
// export end; fewer bytes than asked is allowed), exactly one descriptor
// with REQ_ONE, flags exactly as cached. Data commands pass through to the
// upstream; WRITE, TRIM and WRITE_ZEROES then invalidate the written range,
// rounded out to ShimExport::invalidate_granularity (RoundOutWrite), of
// every context of the export (dirty bitmaps change too) BEFORE the
// reply is built, whether or not the upstream call succeeded, so no client
// can see a stale extent after its write is acknowledged.
//
// Cost: one upstream call per data command; BLOCK_STATUS costs a cache
// lookup per context plus at most one upstream fetch per context on a miss.
// Thread-safety: Handle() may run concurrently from many threads; the
// Negotiated state is read-only and the cache and upstream are thread-safe.
#ifndef BLOCKMETA_SERVER_NBD_HANDLER_H_
#define BLOCKMETA_SERVER_NBD_HANDLER_H_

#include <cstddef>
#include <string>
#include <utility>

#include "server/cache/extent_cache.h"
#include "server/nbd/handshake.h"
#include "server/nbd/request.h"

namespace blockmeta {
namespace nbd {

// Most descriptors in one BLOCK_STATUS chunk (the spec allows 2^20; a
// smaller cap bounds the reply at 2 MiB).
inline constexpr size_t kMaxDescriptorsPerChunk = 1u << 18;

// [offset, offset + length) rounded out to `granularity` (a power of two;
// <= 1 = unchanged), clipped to `size`: {start, length}.
std::pair<uint64_t, uint64_t> RoundOutWrite(uint64_t offset, uint64_t length,
                                            uint64_t granularity,
                                            uint64_t size);

class RequestHandler {
 public:
  // `n` and `cache` must outlive the handler.
  RequestHandler(const Negotiated& n, ExtentCache* cache)
      : n_(n), cache_(cache) {}

  // Handles a request ValidateRequest() accepted; returns the complete
  // reply (header, chunks and data). `payload` is the WRITE data.
  std::string Handle(const Request& r, std::string payload) const;

 private:
  std::string Read(const Request& r, absl::Time deadline) const;
  std::string BlockStatus(const Request& r, absl::Time deadline) const;
  std::string Error(const Request& r, const absl::Status& s) const;
  void ForgetWritten(const Request& r) const;

  const Negotiated& n_;
  ExtentCache* const cache_;
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_HANDLER_H_
