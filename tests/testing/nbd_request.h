// tests/testing/nbd_request.h — test support: the one builder of NBD
// transmission requests for the shim's tests (doc/proto.md "Request
// message": magic, command flags, type, handle/cookie, offset, length, then
// a WRITE's payload).
//
// Req() fills an nbd::Request with any field values, without validation:
// unknown commands and flags, zero lengths, ranges past the end or
// overflowing are all expressible, for tests of hostile input.
// RequestBytes() is the wire form, built by the production encoder
// (nbd::EncodeRequest) so tests and the parser agree byte for byte; its
// `magic` argument replaces the request magic, to build a stream the server
// cannot resynchronize on.
#ifndef BLOCKMETA_TESTS_TESTING_NBD_REQUEST_H_
#define BLOCKMETA_TESTS_TESTING_NBD_REQUEST_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "server/nbd/protocol.h"
#include "server/nbd/request.h"

namespace blockmeta {
namespace nbd {
namespace testing {

// A request header with exactly these fields (default handle 1).
Request Req(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0,
            uint64_t handle = 1);

// The 28-byte header of `r` with `magic` in place of NBD_REQUEST_MAGIC,
// followed by `payload` (sent as is, whatever r.length says).
std::string RequestBytes(const Request& r, std::string_view payload = {},
                         uint32_t magic = kRequestMagic);

}  // namespace testing
}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_NBD_REQUEST_H_
