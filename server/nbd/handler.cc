// server/nbd/handler.cc — request execution against the cache and upstream.
#include "server/nbd/handler.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "server/upstream/nbd_errors.h"

namespace blockmeta {
namespace nbd {

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

std::string RequestHandler::Read(const Request& r, absl::Time deadline) const {
  std::string out;
  size_t header;
  if (n_.structured_replies) {
    AppendChunkHeader(&out, kReplyFlagDone, kReplyTypeOffsetData, r.handle,
                      8 + r.length);
    AppendBe64(&out, r.offset);
  } else {
    out = SimpleReply(r.handle, 0);
  }
  header = out.size();
  out.resize(header + r.length);
  absl::Status s = n_.export_entry->upstream->Pread(&out[header], r.length,
                                                    r.offset, deadline);
  if (!s.ok()) return Error(r, s);
  return out;
}

std::string RequestHandler::BlockStatus(const Request& r,
                                        absl::Time deadline) const {
  const ShimExport& e = *n_.export_entry;
  const bool req_one = (r.flags & kCmdFlagReqOne) != 0;
  const uint64_t end = r.offset + r.length;  // validated: <= export size
  const bool upstream_has_base =
      std::find(n_.info.contexts.begin(), n_.info.contexts.end(),
                kBaseAllocation) != n_.info.contexts.end();
  std::string out;
  for (size_t i = 0; i < n_.contexts.size(); ++i) {
    const MetaContext& ctx = n_.contexts[i];
    const bool synthesize = ctx.name == kBaseAllocation && !upstream_has_base;
    // Owns its captures: read-ahead and detached fetches outlive the call.
    AsyncFetcher fetch = [synthesize, size = n_.info.size,
                          upstream = e.upstream, context = ctx.name](
                             uint64_t off, uint64_t len, FetchDone done) {
      if (synthesize) {  // No allocation info upstream: "data" is safe.
        std::move(done)(ExtentList{{off, std::min(len, size - off), 0}});
        return;
      }
      upstream->AsyncBlockStatus(context, off, len, std::move(done));
    };
    absl::StatusOr<LookupResult> got = cache_->Get(
        CacheKey{e.name, ctx.name}, n_.info.size, r.offset, r.length,
        req_one ? 1 : kMaxDescriptorsPerChunk, fetch, deadline);
    if (!got.ok()) return Error(r, got.status());
    // Contiguous descriptors from r.offset, clipped to the request.
    std::string desc;
    uint64_t cursor = r.offset;
    size_t count = 0;
    for (const Extent& x : got->extents) {
      if (x.length == 0 || x.end() <= cursor) continue;
      if (x.offset > cursor || cursor >= end) break;
      uint64_t len = std::min(x.end(), end) - cursor;
      AppendBe32(&desc, static_cast<uint32_t>(len));
      AppendBe32(&desc, x.flags);
      cursor += len;
      if (++count == (req_one ? 1 : kMaxDescriptorsPerChunk)) break;
    }
    if (count == 0) {
      return Error(r, absl::InternalError("no extents for the request"));
    }
    const bool last = i + 1 == n_.contexts.size();
    AppendChunkHeader(&out, last ? kReplyFlagDone : 0, kReplyTypeBlockStatus,
                      r.handle, static_cast<uint32_t>(4 + desc.size()));
    AppendBe32(&out, ctx.id);
    out.append(desc);
  }
  return out;
}

std::string RequestHandler::Handle(const Request& r,
                                   std::string payload) const {
  const ShimExport& e = *n_.export_entry;
  Upstream* up = e.upstream;
  const absl::Time deadline = absl::Now() + e.upstream_timeout;
  uint32_t flags = 0;
  if (r.flags & kCmdFlagFua) flags |= blockmeta::kCmdFlagFua;
  if (r.flags & kCmdFlagNoHole) flags |= blockmeta::kCmdFlagNoHole;
  if (r.flags & kCmdFlagFastZero) flags |= blockmeta::kCmdFlagFastZero;
  absl::Status s;
  switch (r.type) {
    case kCmdRead:
      return Read(r, deadline);
    case kCmdBlockStatus:
      return BlockStatus(r, deadline);
    case kCmdWrite:
      s = up->Pwrite(payload.data(), r.length, r.offset, flags, deadline);
      ForgetWritten(r);
      break;
    case kCmdTrim:
      s = up->Trim(r.length, r.offset, flags, deadline);
      ForgetWritten(r);
      break;
    case kCmdWriteZeroes:
      s = up->Zero(r.length, r.offset, flags, deadline);
      ForgetWritten(r);
      break;
    case kCmdFlush:
      s = up->Flush(deadline);
      break;
    case kCmdCache:
      s = up->Cache(r.length, r.offset, deadline);
      break;
    default:
      s = absl::InvalidArgumentError("unknown command");
      break;
  }
  if (!s.ok()) return Error(r, s);
  return SimpleReply(r.handle, 0);
}

}  // namespace nbd
}  // namespace blockmeta
