// server/nbd/handler.h — executes validated NBD requests: the "handle"
// half of the shim's request path (request.h parses and validates).
//
// BLOCK_STATUS is answered from the shared ExtentCache (key: export name +
// context), whose AsyncFetcher calls Upstream::AsyncBlockStatus on a miss
// (the completion fills the cache; the shim never blocks on it); one chunk
// per selected context, descriptors clipped to the request (never past the
// export end; fewer bytes than asked is allowed), exactly one descriptor
// with REQ_ONE, flags exactly as cached. Data commands pass through to the
// upstream; WRITE, TRIM and WRITE_ZEROES then invalidate the written range,
// rounded out to ShimExport::invalidate_granularity (RoundOutWrite), of
// every context of the export (dirty bitmaps change too) BEFORE the
// reply is built, whether or not the upstream call succeeded, so no client
// can see a stale extent after its write is acknowledged.
//
// Data commands run on the upstream's asynchronous API (Start): READ
// allocates the whole reply (header + data, not zero-filled) and the
// upstream reads straight into it; the completion, on an upstream engine
// thread, finishes the reply and hands it to `done`. No thread waits for a
// data command and no lock is held while it runs. A command is bounded by
// the export's upstream timeout, which the Upstream itself enforces (the
// shim's ShimExport::upstream_timeout is the same upstream_timeout_ms);
// an overdue command answers DEADLINE_EXCEEDED, mapped like every error by
// NbdErrorFromStatus. Requests above the upstream's maximum block size are
// split by the Upstream (chunked.h), FUA and the other flags pass through.
//
// BLOCK_STATUS is answered in one of two ways, by the same encoder
// (AppendStatusChunk): AnswerFromCache() when every selected context is a
// cache hit (ExtentCache::Lookup + Record; never waits, so the connection
// answers it on its own thread), else Handle() through ExtentCache::Get,
// which may wait for a fetch and so runs on a pool thread.
//
// Cost: one upstream call per data command (no copy of READ data in the
// shim); BLOCK_STATUS costs a cache lookup per context plus at most one
// upstream fetch per context on a miss (Handle() then blocks its thread).
// Thread-safety: Handle() and Start() may run concurrently from many
// threads; the Negotiated state is read-only and the cache and upstream are
// thread-safe. The handler must outlive every completion of Start() (the
// connection waits for them before it ends).
#ifndef BLOCKMETA_SERVER_NBD_HANDLER_H_
#define BLOCKMETA_SERVER_NBD_HANDLER_H_

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/functional/any_invocable.h"
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

// The bytes of one complete reply: `str`, or (READ data) `raw_size` bytes
// at `raw`, allocated without being zero-filled.
struct Reply {
  std::string str;
  std::unique_ptr<char[]> raw;
  size_t raw_size = 0;
  const char* data() const { return raw ? raw.get() : str.data(); }
  size_t size() const { return raw ? raw_size : str.size(); }
};
using ReplyFn = absl::AnyInvocable<void(Reply) &&>;

class RequestHandler {
 public:
  // `n` and `cache` must outlive the handler.
  RequestHandler(const Negotiated& n, ExtentCache* cache)
      : n_(n), cache_(cache) {}

  // Handles a request ValidateRequest() accepted; returns the complete
  // reply (header, chunks and data). `payload` is the WRITE data.
  // Blocks until the reply is built (Start() plus a wait for data
  // commands).
  std::string Handle(const Request& r, std::string payload) const;

  // A BLOCK_STATUS answered from the cache alone, without waiting and
  // without a fetch: the complete reply when every selected context is a
  // hit (counted as hits, read-ahead kept going), else nullopt (nothing
  // counted; Handle() answers it). Cheap enough for the connection's own
  // thread: one Lookup per context.
  std::optional<std::string> AnswerFromCache(const Request& r) const;

  // True for the commands Start() runs (everything but BLOCK_STATUS, which
  // consults the cache and needs a thread of its own).
  static bool IsAsync(uint16_t type) { return type != kCmdBlockStatus; }
  // Starts a data command (IsAsync) on the upstream's asynchronous API;
  // `done` is called exactly once with the complete reply, on an upstream
  // engine thread, or on the calling thread before Start() returns (an
  // in-memory upstream, or a command that cannot be issued). WRITE, TRIM
  // and WRITE_ZEROES invalidate the cache after the upstream answered and
  // before `done`.
  void Start(const Request& r, std::string payload, ReplyFn done) const;

 private:
  void StartRead(const Request& r, ReplyFn done) const;
  std::string BlockStatus(const Request& r, absl::Time deadline) const;
  // Descriptors one chunk may hold: 1 with REQ_ONE.
  static size_t MaxDescriptors(const Request& r);
  // Appends context i's chunk built from `extents` (from Lookup or Get);
  // false when they do not start at r.offset (nothing appended).
  bool AppendStatusChunk(const Request& r, size_t i, const ExtentList& extents,
                         std::string* out) const;
  std::string Error(const Request& r, const absl::Status& s) const;
  void ForgetWritten(const Request& r) const;

  const Negotiated& n_;
  ExtentCache* const cache_;
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_HANDLER_H_
