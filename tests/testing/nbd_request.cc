// tests/testing/nbd_request.cc — see nbd_request.h.
#include "tests/testing/nbd_request.h"

namespace blockmeta {
namespace nbd {
namespace testing {

Request Req(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags,
            uint64_t handle) {
  Request r;
  r.type = type;
  r.offset = offset;
  r.length = length;
  r.flags = flags;
  r.handle = handle;
  return r;
}

std::string RequestBytes(const Request& r, std::string_view payload,
                         uint32_t magic) {
  std::string s = EncodeRequest(r);
  PutBe32(reinterpret_cast<uint8_t*>(s.data()), magic);
  s.append(payload.data(), payload.size());
  return s;
}

}  // namespace testing
}  // namespace nbd
}  // namespace blockmeta
