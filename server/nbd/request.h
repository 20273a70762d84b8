// server/nbd/request.h — NBD transmission-phase request parsing, validation
// and reply encoding (no I/O, no upstream): the "parse, then validate"
// half of the shim's request path (the handling half is handler.h).
//
// ValidateRequest() decides, from the header alone and the negotiated
// state, whether a request may be handled and, if not, which NBD error the
// client gets and whether the stream can stay in sync:
// * bad magic: disconnect (the stream cannot be resynchronized);
// * unknown command, unknown or unadvertised flag, zero length, offset +
//   length past the end (or overflowing), unaligned data command,
//   BLOCK_STATUS without a selected context: EINVAL;
// * writes to a read-only export: EPERM;
// * READ longer than the negotiated maximum payload: EOVERFLOW with
//   structured replies, else EINVAL; WRITE longer: EINVAL, its payload is
//   read and thrown away when at most 2x the maximum, else disconnect.
// Cost: O(1) per request. Thread-safety: pure functions.
#ifndef BLOCKMETA_SERVER_NBD_REQUEST_H_
#define BLOCKMETA_SERVER_NBD_REQUEST_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "server/nbd/handshake.h"
#include "server/nbd/protocol.h"

namespace blockmeta {
namespace nbd {

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t handle = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// Decodes a 28-byte request header; false when the magic is wrong.
bool ParseRequestHeader(const uint8_t* buf, Request* out);
// Encodes one (for tests and clients).
std::string EncodeRequest(const Request& r);

struct Verdict {
  uint32_t error = 0;            // NBD error to reply with; 0 = handle it
  std::string_view reason;       // for logs and structured error messages
  uint64_t payload = 0;          // WRITE payload bytes following the header
  bool discard_payload = false;  // read `payload` bytes and drop them
  bool disconnect = false;       // stop reading (DISC, or cannot resync)
};

Verdict ValidateRequest(const Request& r, const Negotiated& n);

// Reply encoding.
std::string SimpleReply(uint64_t handle, uint32_t error);
void AppendChunkHeader(std::string* out, uint16_t flags, uint16_t type,
                       uint64_t handle, uint32_t length);
// A complete error reply: a final NBD_REPLY_TYPE_ERROR chunk when
// structured replies were negotiated, else a simple reply.
std::string ErrorReply(bool structured, uint64_t handle, uint32_t error,
                       std::string_view message);

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_REQUEST_H_
