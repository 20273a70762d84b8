// server/nbd/handler.cc — request execution against the cache and upstream.
#include "server/nbd/handler.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/upstream/nbd_errors.h"

namespace blockmeta {
namespace nbd {

namespace {

// The export's upstream expired: the export was removed (its sessions are
// being closed).
absl::Status ExportRemoved() {
  return absl::NotFoundError("export was removed");
}

}  // namespace

std::string RequestHandler::Error(const Request& r,
                                  const absl::Status& s) const {
  // The one status -> NBD error map (server/upstream/nbd_errors.h).
  uint32_t err = blockmeta::NbdErrorFromStatus(s);
  if (err == 0) err = kNbdEio;
  const std::string message(s.message());
  return ErrorReply(n_.structured_replies, r.handle, err, message);
}

// The range a write of [offset, offset + length) may have changed in any
// context: rounded out to the export's granularity, clipped to the export.
// Rounded here, before ExtentCache::InvalidateExportRange, so a fetch in
// flight is cut (poisoned) at the same rounded range.
std::pair<uint64_t, uint64_t> RoundOutWrite(uint64_t offset, uint64_t length,
                                            uint64_t granularity,
                                            uint64_t size) {
  if (granularity <= 1) return {offset, length};
  const uint64_t start = offset - offset % granularity;
  uint64_t end = offset + length;  // validated: <= size
  const uint64_t rem = end % granularity;
  if (rem != 0)
    end = end > size - (granularity - rem) ? size : end + (granularity - rem);
  if (end > size) end = size;
  return {start, end - start};
}

void RequestHandler::ForgetWritten(const Request& r) const {
  const ShimExport& e = *n_.export_entry;
  auto [off, len] =
      RoundOutWrite(r.offset, r.length, e.invalidate_granularity, n_.info.size);
  cache_->InvalidateExportRange(e.name, off, len);
}

void RequestHandler::StartRead(const Request& r, ReplyFn done) const {
  std::string head;
  if (n_.structured_replies) {
    AppendChunkHeader(&head, kReplyFlagDone, kReplyTypeOffsetData, r.handle,
                      8 + r.length);
    AppendBe64(&head, r.offset);
  } else {
    head = SimpleReply(r.handle, 0);
  }
  Reply reply;
  reply.raw_size = head.size() + r.length;
  // Not value-initialised: the upstream fills the data part.
  reply.raw.reset(new char[reply.raw_size]);
  std::memcpy(reply.raw.get(), head.data(), head.size());
  char* const data = reply.raw.get() + head.size();
  std::shared_ptr<Upstream> up = n_.export_entry->upstream.lock();
  if (up == nullptr) {
    Reply e;
    e.str = Error(r, ExportRemoved());
    return std::move(done)(std::move(e));
  }
  // The buffer moves into the completion (a unique_ptr keeps its address),
  // so it lives until the upstream is done with it, whoever waits.
  up->AsyncPread(data, r.length, r.offset,
                 [this, r, reply = std::move(reply),
                  done = std::move(done)](const absl::Status& s) mutable {
                   if (!s.ok()) {
                     Reply e;
                     e.str = Error(r, s);
                     return std::move(done)(std::move(e));
                   }
                   std::move(done)(std::move(reply));
                 });
}

size_t RequestHandler::MaxDescriptors(const Request& r) {
  return (r.flags & kCmdFlagReqOne) != 0 ? 1 : kMaxDescriptorsPerChunk;
}

// The one encoder of BLOCK_STATUS replies, for cache hits answered on the
// connection's thread and for answers a pool worker waited for: so both
// obey the same rules (doc/proto.md "NBD_CMD_BLOCK_STATUS"): descriptors
// contiguous from r.offset, clipped to the request (with REQ_ONE exactly
// one, never longer than the request), at most MaxDescriptors.
bool RequestHandler::AppendStatusChunk(const Request& r, size_t i,
                                       const ExtentList& extents,
                                       std::string* out) const {
  const uint64_t end = r.offset + r.length;  // validated: <= export size
  const size_t max = MaxDescriptors(r);
  std::string desc;
  uint64_t cursor = r.offset;
  size_t count = 0;
  for (const Extent& x : extents) {
    if (x.length == 0 || x.end() <= cursor) continue;
    if (x.offset > cursor || cursor >= end) break;
    uint64_t len = std::min(x.end(), end) - cursor;
    AppendBe32(&desc, static_cast<uint32_t>(len));
    AppendBe32(&desc, x.flags);
    cursor += len;
    if (++count == max) break;
  }
  if (count == 0) return false;
  const bool last = i + 1 == n_.contexts.size();
  AppendChunkHeader(out, last ? kReplyFlagDone : 0, kReplyTypeBlockStatus,
                    r.handle, static_cast<uint32_t>(4 + desc.size()));
  AppendBe32(out, n_.contexts[i].id);
  out->append(desc);
  return true;
}

std::optional<std::string> RequestHandler::AnswerFromCache(
    const Request& r) const {
  const ShimExport& e = *n_.export_entry;
  const size_t max = MaxDescriptors(r);
  const uint64_t end = r.offset + r.length;
  // Probe every context first (Lookup counts nothing): a request is
  // answered here only when all of them hit, else the pool's Get() answers
  // (and counts) it whole.
  std::vector<LookupResult> found;
  found.reserve(n_.contexts.size());
  for (const MetaContext& ctx : n_.contexts) {
    LookupResult got =
        cache_->Lookup(CacheKey{e.name, ctx.name}, r.offset, r.length, max);
    if (got.extents.empty() ||
        (got.next_offset < end && got.extents.size() < max)) {
      return std::nullopt;
    }
    found.push_back(std::move(got));
  }
  std::string out;
  for (size_t i = 0; i < found.size(); ++i) {
    if (!AppendStatusChunk(r, i, found[i].extents, &out)) return std::nullopt;
  }
  for (size_t i = 0; i < found.size(); ++i) {
    found[i].outcome = Outcome::kHit;
    cache_->Record(CacheKey{e.name, n_.contexts[i].name}, r.offset, found[i]);
  }
  return out;
}

std::string RequestHandler::BlockStatus(const Request& r,
                                        absl::Time deadline) const {
  const ShimExport& e = *n_.export_entry;
  const bool upstream_has_base =
      std::find(n_.info.contexts.begin(), n_.info.contexts.end(),
                kBaseAllocation) != n_.info.contexts.end();
  std::string out;
  for (size_t i = 0; i < n_.contexts.size(); ++i) {
    const MetaContext& ctx = n_.contexts[i];
    const bool synthesize = ctx.name == kBaseAllocation && !upstream_has_base;
    // Owns its captures: read-ahead and detached fetches outlive the call.
    // The upstream is a weak reference locked per fetch: the cache never
    // keeps a removed export's upstream alive.
    AsyncFetcher fetch = [synthesize, size = n_.info.size,
                          upstream = e.upstream, context = ctx.name](
                             uint64_t off, uint64_t len, FetchDone done) {
      if (synthesize) {  // No allocation info upstream: "data" is safe.
        std::move(done)(ExtentList{{off, std::min(len, size - off), 0}});
        return;
      }
      std::shared_ptr<Upstream> up = upstream.lock();
      if (up == nullptr) return std::move(done)(ExportRemoved());
      up->AsyncBlockStatus(context, off, len, std::move(done));
    };
    absl::StatusOr<LookupResult> got =
        cache_->Get(CacheKey{e.name, ctx.name}, n_.info.size, r.offset,
                    r.length, MaxDescriptors(r), fetch, deadline);
    if (!got.ok()) return Error(r, got.status());
    if (!AppendStatusChunk(r, i, got->extents, &out)) {
      return Error(r, absl::InternalError("no extents for the request"));
    }
  }
  return out;
}

std::string RequestHandler::Handle(const Request& r,
                                   std::string payload) const {
  if (!IsAsync(r.type)) {
    return BlockStatus(r, absl::Now() + n_.export_entry->upstream_timeout);
  }
  auto got = std::make_shared<std::pair<absl::Notification, Reply>>();
  Start(r, std::move(payload), [got](Reply reply) {
    got->second = std::move(reply);
    got->first.Notify();
  });
  got->first.WaitForNotification();
  const Reply& reply = got->second;
  return std::string(reply.data(), reply.size());
}

void RequestHandler::Start(const Request& r, std::string payload,
                           ReplyFn done) const {
  if (r.type == kCmdRead) return StartRead(r, std::move(done));
  uint32_t flags = 0;
  if (r.flags & kCmdFlagFua) flags |= blockmeta::kCmdFlagFua;
  if (r.flags & kCmdFlagNoHole) flags |= blockmeta::kCmdFlagNoHole;
  if (r.flags & kCmdFlagFastZero) flags |= blockmeta::kCmdFlagFastZero;
  const bool writes =
      r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes;
  // The simple reply (or the error) once the upstream answered. Writes
  // first forget what they may have changed, whether or not they succeeded
  // (a failed write may have half-written). That runs after the upstream
  // answered: what a block-status fetch overlapping the write stored
  // meanwhile is dropped, and one still in flight is poisoned (the
  // ExtentCache rule), over the same rounded range; and before the reply,
  // so no client sees a stale extent after its write is acknowledged.
  StatusCallback finish =
      [this, r, writes, done = std::move(done)](const absl::Status& s) mutable {
        if (writes) ForgetWritten(r);
        Reply reply;
        reply.str = s.ok() ? SimpleReply(r.handle, 0) : Error(r, s);
        std::move(done)(std::move(reply));
      };
  std::shared_ptr<Upstream> up = n_.export_entry->upstream.lock();
  if (up == nullptr) return std::move(finish)(ExportRemoved());
  switch (r.type) {
    case kCmdWrite: {
      // A moved std::string may change address (short strings): own it
      // behind a pointer that the completion keeps alive.
      auto data = std::make_unique<std::string>(std::move(payload));
      const char* p = data->data();
      up->AsyncPwrite(
          p, r.length, r.offset, flags,
          [data = std::move(data), finish = std::move(finish)](
              absl::Status s) mutable { std::move(finish)(std::move(s)); });
      return;
    }
    case kCmdTrim:
      return up->AsyncTrim(r.length, r.offset, flags, std::move(finish));
    case kCmdWriteZeroes:
      return up->AsyncZero(r.length, r.offset, flags, std::move(finish));
    case kCmdFlush:
      return up->AsyncFlush(std::move(finish));
    case kCmdCache:
      return up->AsyncCache(r.length, r.offset, std::move(finish));
    default:
      return std::move(finish)(absl::InvalidArgumentError("unknown command"));
  }
}

}  // namespace nbd
}  // namespace blockmeta
