// server/nbd/request.cc — request parsing, validation, reply encoding.
#include "server/nbd/request.h"

#include "server/upstream/nbd_errors.h"
namespace blockmeta {
namespace nbd {

bool ParseRequestHeader(const uint8_t* buf, Request* out) {
  if (GetBe32(buf) != kRequestMagic) return false;
  out->flags = GetBe16(buf + 4);
  out->type = GetBe16(buf + 6);
  out->handle = GetBe64(buf + 8);
  out->offset = GetBe64(buf + 16);
  out->length = GetBe32(buf + 24);
  return true;
}

std::string EncodeRequest(const Request& r) {
  std::string s;
  AppendBe32(&s, kRequestMagic);
  AppendBe16(&s, r.flags);
  AppendBe16(&s, r.type);
  AppendBe64(&s, r.handle);
  AppendBe64(&s, r.offset);
  AppendBe32(&s, r.length);
  return s;
}

namespace {

Verdict Fail(uint32_t error, std::string_view reason) {
  Verdict v;
  v.error = error;
  v.reason = reason;
  return v;
}

}  // namespace

Verdict ValidateRequest(const Request& r, const Negotiated& n) {
  const uint16_t tf = n.transmission_flags;
  const bool ro = (tf & kFlagReadOnly) != 0;
  const uint64_t size = n.info.size;
  Verdict v;
  if (r.type == kCmdWrite) {
    // The payload follows whatever we decide; keep the stream in sync.
    v = Fail(0, "");
    v.payload = r.length;
    if (r.length > n.max_payload) {
      if (uint64_t{r.length} > 2 * uint64_t{n.max_payload}) {
        v.disconnect = true;
        v.reason = "write payload too large to skip";
        return v;
      }
      v.error = kNbdEinval;
      v.reason = "write larger than the maximum payload";
      v.discard_payload = true;
      return v;
    }
  }
  auto fail = [&](uint32_t error, std::string_view reason) {
    v.error = error;
    v.reason = reason;
    v.discard_payload = v.payload > 0;
    return v;
  };

  // Flags valid for each command.
  uint16_t allowed = 0;
  bool range = true, data_cmd = false;
  switch (r.type) {
    case kCmdRead:
      if (n.structured_replies) allowed |= kCmdFlagDf;
      data_cmd = true;
      break;
    case kCmdWrite:
      if (tf & kFlagSendFua) allowed |= kCmdFlagFua;
      data_cmd = true;
      break;
    case kCmdDisc:
      v.disconnect = true;
      return v;
    case kCmdFlush:
      range = false;
      break;
    case kCmdTrim:
      if (tf & kFlagSendFua) allowed |= kCmdFlagFua;
      data_cmd = true;
      break;
    case kCmdCache:
      break;
    case kCmdWriteZeroes:
      if (tf & kFlagSendFua) allowed |= kCmdFlagFua;
      allowed |= kCmdFlagNoHole;
      if (tf & kFlagSendFastZero) allowed |= kCmdFlagFastZero;
      data_cmd = true;
      break;
    case kCmdBlockStatus:
      allowed |= kCmdFlagReqOne;
      break;
    default:
      return fail(kNbdEinval, "unknown command");
  }
  // A server that advertises FUA must accept it on every command
  // (doc/proto.md, NBD_CMD_FLAG_FUA); it only changes WRITE, TRIM and
  // WRITE_ZEROES.
  if (tf & kFlagSendFua) allowed |= kCmdFlagFua;
  if (r.flags & ~allowed) return fail(kNbdEinval, "invalid command flags");

  // Commands the export does not offer.
  switch (r.type) {
    case kCmdWrite:
      if (ro) return fail(kNbdEperm, "export is read-only");
      break;
    case kCmdTrim:
      if (ro) return fail(kNbdEperm, "export is read-only");
      if (!(tf & kFlagSendTrim)) return fail(kNbdEinval, "trim not supported");
      break;
    case kCmdWriteZeroes:
      if (ro) return fail(kNbdEperm, "export is read-only");
      if (!(tf & kFlagSendWriteZeroes)) {
        return fail(kNbdEinval, "write zeroes not supported");
      }
      break;
    case kCmdFlush:
      if (!(tf & kFlagSendFlush))
        return fail(kNbdEinval, "flush not supported");
      if (r.offset != 0 || r.length != 0) {
        return fail(kNbdEinval, "flush offset and length must be 0");
      }
      break;
    case kCmdCache:
      if (!(tf & kFlagSendCache))
        return fail(kNbdEinval, "cache not supported");
      break;
    case kCmdBlockStatus:
      if (!n.structured_replies || n.contexts.empty()) {
        return fail(kNbdEinval, "no metadata context selected");
      }
      break;
    default:
      break;
  }

  if (range) {
    if (r.length == 0) return fail(kNbdEinval, "zero length");
    if (r.offset > size || r.length > size - r.offset) {
      return fail(kNbdEinval, "request past the end of the export");
    }
    if (data_cmd && n.min_block_size > 1 &&
        (r.offset % n.min_block_size != 0 ||
         r.length % n.min_block_size != 0)) {
      return fail(kNbdEinval, "request not aligned to the minimum block size");
    }
  }
  if (r.type == kCmdRead && r.length > n.max_payload) {
    return fail(n.structured_replies ? kNbdEoverflow : kNbdEinval,
                "read larger than the maximum payload");
  }
  return v;
}

std::string SimpleReply(uint64_t handle, uint32_t error) {
  std::string s;
  AppendBe32(&s, kSimpleReplyMagic);
  AppendBe32(&s, error);
  AppendBe64(&s, handle);
  return s;
}

void AppendChunkHeader(std::string* out, uint16_t flags, uint16_t type,
                       uint64_t handle, uint32_t length) {
  AppendBe32(out, kStructuredReplyMagic);
  AppendBe16(out, flags);
  AppendBe16(out, type);
  AppendBe64(out, handle);
  AppendBe32(out, length);
}

std::string ErrorReply(bool structured, uint64_t handle, uint32_t error,
                       std::string_view message) {
  if (!structured) return SimpleReply(handle, error);
  message = message.substr(0, 4096);
  std::string s;
  AppendChunkHeader(&s, kReplyFlagDone, kReplyTypeError, handle,
                    static_cast<uint32_t>(6 + message.size()));
  AppendBe32(&s, error);
  AppendBe16(&s, static_cast<uint16_t>(message.size()));
  s.append(message);
  return s;
}

}  // namespace nbd
}  // namespace blockmeta
