// tests/testing/nbd_test_client.h — helpers to craft NBD client byte streams
// and decode server output, for the shim's unit tests and fuzzer seeds
// (testonly): pure functions over byte strings, plus RawClient, a raw NBD
// client over a socket (blocking I/O, each read bounded by a timeout).
#ifndef BLOCKMETA_TESTS_TESTING_NBD_TEST_CLIENT_H_
#define BLOCKMETA_TESTS_TESTING_NBD_TEST_CLIENT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/nbd/protocol.h"
#include "server/nbd/request.h"
#include "server/nbd/stream.h"
#include "tests/testing/nbd_request.h"

namespace blockmeta {
namespace nbd {
namespace testing {

// C: client flags.
std::string ClientFlags(uint32_t flags = kClientFlagFixedNewstyle |
                                         kClientFlagNoZeroes);
// C: one option: IHAVEOPT, code, length, data.
std::string Option(uint32_t opt, const std::string& data = "");
// Payload of NBD_OPT_GO / NBD_OPT_INFO.
std::string GoData(const std::string& name,
                   const std::vector<uint16_t>& infos = {});
// Payload of NBD_OPT_{LIST,SET}_META_CONTEXT.
std::string MetaData(const std::string& name,
                     const std::vector<std::string>& queries);

struct OptReply {
  uint32_t opt = 0;
  uint32_t type = 0;
  std::string data;
};
// Decodes option replies after the 18-byte greeting; stops at the first
// incomplete or non-reply bytes, leaving `*rest` at them (if non-null).
std::vector<OptReply> ParseOptReplies(const std::string& out,
                                      std::string* rest = nullptr);

// A raw NBD client over a socket, able to send anything (bad input on
// purpose). Every read is bounded by `timeout`.
class RawClient {
 public:
  static absl::StatusOr<std::unique_ptr<RawClient>> ConnectUnix(
      const std::string& path, absl::Duration timeout = absl::Seconds(10));
  static absl::StatusOr<std::unique_ptr<RawClient>> ConnectTcp(
      int port, absl::Duration timeout = absl::Seconds(10));
  ~RawClient();

  absl::Status Send(const std::string& bytes);
  absl::StatusOr<std::string> Read(size_t n);
  // True when the server closed the connection (EOF) within the timeout;
  // any bytes received before the EOF are discarded.
  bool WaitForClose();
  // Half-closes (client hang-up) without closing the fd.
  void HangUp();

  struct Result {
    uint64_t size = 0;
    uint16_t flags = 0;
    std::vector<OptReply> replies;  // every option reply received
  };
  // Greeting, client flags, optional STRUCTURED_REPLY and SET_META_CONTEXT,
  // then GO. Fails if GO is refused.
  absl::StatusOr<Result> Handshake(const std::string& export_name,
                                   bool structured,
                                   const std::vector<std::string>& contexts);

  struct Chunk {
    uint16_t flags = 0;
    uint16_t type = 0;
    std::string data;
  };
  struct Reply {
    uint64_t handle = 0;
    uint32_t error = 0;         // simple reply error or first error chunk's
    std::vector<Chunk> chunks;  // structured replies
    std::string data;           // simple READ data
  };
  // Reads one complete reply. `simple_read_length` is the data length that
  // follows a successful simple reply (READ), else 0.
  absl::StatusOr<Reply> ReadReply(uint32_t simple_read_length = 0);
  absl::StatusOr<Reply> Call(const Request& r, const std::string& payload = "",
                             uint32_t simple_read_length = 0);

  int fd() const { return fd_; }

 private:
  RawClient(int fd, absl::Duration timeout);
  int fd_;
  absl::Duration timeout_;
  FdStream stream_;
};

// Decodes a BLOCK_STATUS chunk: context id and (length, flags) pairs.
struct Descriptors {
  uint32_t context_id = 0;
  std::vector<std::pair<uint32_t, uint32_t>> extents;
};
Descriptors DecodeBlockStatus(const std::string& chunk_data);

}  // namespace testing
}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_NBD_TEST_CLIENT_H_
