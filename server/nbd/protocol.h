// server/nbd/protocol.h — NBD wire constants and big-endian codecs.
//
// Owns the numbers of the NBD protocol (NetworkBlockDevice/nbd
// doc/proto.md) that the shim speaks: fixed newstyle handshake magics,
// option and option-reply codes, info types, transmission flags, commands,
// command flags, structured reply types and error values, plus helpers
// to encode/decode big-endian integers. Header-only; no state.
#ifndef BLOCKMETA_SERVER_NBD_PROTOCOL_H_
#define BLOCKMETA_SERVER_NBD_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace blockmeta {
namespace nbd {

// Handshake.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454f5054ull;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;

inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;

// Options.
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptPeekExport = 4;
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;
inline constexpr uint32_t kOptExtendedHeaders = 11;

// Option replies.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrBit = 1u << 31;
inline constexpr uint32_t kRepErrUnsup = kRepErrBit | 1;
inline constexpr uint32_t kRepErrPolicy = kRepErrBit | 2;
inline constexpr uint32_t kRepErrInvalid = kRepErrBit | 3;
inline constexpr uint32_t kRepErrPlatform = kRepErrBit | 4;
inline constexpr uint32_t kRepErrTlsReqd = kRepErrBit | 5;
inline constexpr uint32_t kRepErrUnknown = kRepErrBit | 6;
inline constexpr uint32_t kRepErrShutdown = kRepErrBit | 7;
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepErrBit | 8;
inline constexpr uint32_t kRepErrTooBig = kRepErrBit | 9;

// NBD_INFO_* types (replies to NBD_OPT_INFO / NBD_OPT_GO).
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
inline constexpr uint16_t kFlagHasFlags = 1u << 0;
inline constexpr uint16_t kFlagReadOnly = 1u << 1;
inline constexpr uint16_t kFlagSendFlush = 1u << 2;
inline constexpr uint16_t kFlagSendFua = 1u << 3;
inline constexpr uint16_t kFlagRotational = 1u << 4;
inline constexpr uint16_t kFlagSendTrim = 1u << 5;
inline constexpr uint16_t kFlagSendWriteZeroes = 1u << 6;
inline constexpr uint16_t kFlagSendDf = 1u << 7;
inline constexpr uint16_t kFlagCanMultiConn = 1u << 8;
inline constexpr uint16_t kFlagSendResize = 1u << 9;
inline constexpr uint16_t kFlagSendCache = 1u << 10;
inline constexpr uint16_t kFlagSendFastZero = 1u << 11;

// Transmission.
inline constexpr uint32_t kRequestMagic = 0x25609513u;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;
inline constexpr size_t kRequestHeaderSize = 28;
inline constexpr size_t kSimpleReplyHeaderSize = 16;
inline constexpr size_t kStructuredReplyHeaderSize = 20;

inline constexpr uint16_t kCmdRead = 0;
inline constexpr uint16_t kCmdWrite = 1;
inline constexpr uint16_t kCmdDisc = 2;
inline constexpr uint16_t kCmdFlush = 3;
inline constexpr uint16_t kCmdTrim = 4;
inline constexpr uint16_t kCmdCache = 5;
inline constexpr uint16_t kCmdWriteZeroes = 6;
inline constexpr uint16_t kCmdBlockStatus = 7;

inline constexpr uint16_t kCmdFlagFua = 1u << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr uint16_t kCmdFlagDf = 1u << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;

inline constexpr uint16_t kReplyFlagDone = 1u << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeError = (1u << 15) | 1;
inline constexpr uint16_t kReplyTypeErrorOffset = (1u << 15) | 2;

// Error values (doc/proto.md "Error values"): the only values a reply's
// error field may carry. They equal Linux errno numbers, but the protocol
// fixes them, so code converts explicitly (server/upstream/nbd_errors.h maps
// errno and absl::Status to these) and never sends a host errno as is.
inline constexpr uint32_t kNbdEperm = 1;        // Operation not permitted
inline constexpr uint32_t kNbdEio = 5;          // Input/output error
inline constexpr uint32_t kNbdEnomem = 12;      // Cannot allocate memory
inline constexpr uint32_t kNbdEinval = 22;      // Invalid argument
inline constexpr uint32_t kNbdEnospc = 28;      // No space left on device
inline constexpr uint32_t kNbdEoverflow = 75;   // Value too large
inline constexpr uint32_t kNbdEnotsup = 95;     // Operation not supported
inline constexpr uint32_t kNbdEshutdown = 108;  // Server is shutting down

// Strings (export names, context names) must not exceed this (proto.md).
inline constexpr size_t kMaxStringLength = 4096;
// Servers should send at most this many descriptors per chunk.
inline constexpr size_t kMaxBlockStatusDescriptors = 1u << 20;

// Big-endian codecs. Get* read from a buffer the caller has bounds-checked.
inline uint16_t GetBe16(const uint8_t* p) {
  return static_cast<uint16_t>((uint16_t{p[0]} << 8) | p[1]);
}
inline uint32_t GetBe32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
inline uint64_t GetBe64(const uint8_t* p) {
  return (uint64_t{GetBe32(p)} << 32) | GetBe32(p + 4);
}
inline void PutBe16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v >> 8);
  p[1] = static_cast<uint8_t>(v);
}
inline void PutBe32(uint8_t* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}
inline void PutBe64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}

// Appends big-endian integers / raw bytes to a byte string.
inline void AppendBe16(std::string* s, uint16_t v) {
  uint8_t b[2];
  PutBe16(b, v);
  s->append(reinterpret_cast<const char*>(b), 2);
}
inline void AppendBe32(std::string* s, uint32_t v) {
  uint8_t b[4];
  PutBe32(b, v);
  s->append(reinterpret_cast<const char*>(b), 4);
}
inline void AppendBe64(std::string* s, uint64_t v) {
  uint8_t b[8];
  PutBe64(b, v);
  s->append(reinterpret_cast<const char*>(b), 8);
}

// Human names for logs; "unknown" for values outside the tables.
inline std::string_view CommandName(uint16_t type) {
  switch (type) {
    case kCmdRead:
      return "READ";
    case kCmdWrite:
      return "WRITE";
    case kCmdDisc:
      return "DISC";
    case kCmdFlush:
      return "FLUSH";
    case kCmdTrim:
      return "TRIM";
    case kCmdCache:
      return "CACHE";
    case kCmdWriteZeroes:
      return "WRITE_ZEROES";
    case kCmdBlockStatus:
      return "BLOCK_STATUS";
    default:
      return "unknown";
  }
}

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_PROTOCOL_H_
