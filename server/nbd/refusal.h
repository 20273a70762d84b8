// server/nbd/refusal.h — the answer a client gets when the shim cannot
// take it (every slot of NbdShimConfig.max_connections is held and no
// session can make room in time): a short, polite handshake instead of a
// bare EOF.
//
// doc/proto.md ("Termination of the session during option haggling"): a
// server that does not want to serve a client errors its options until it
// gives up, and a client that receives NBD_REP_ERR_SHUTDOWN MUST initiate
// a soft disconnect. So the refusal sends the greeting, then answers every
// option with NBD_REP_ERR_SHUTDOWN and a message ("... at max_connections
// ...") that clients print (libnbd, qemu), NBD_OPT_ABORT with an ACK, and
// hangs up where no error can be sent (NBD_OPT_EXPORT_NAME, bad magic,
// unknown client flags) or after kMaxOptions options.
//
// Pure: no I/O, no clock (the server bounds each refusal in time and
// bytes). Cost: O(bytes fed); the largest option payload it skips is 64 KiB
// (larger ones: hang up). Thread-safety: one owner.
#ifndef BLOCKMETA_SERVER_NBD_REFUSAL_H_
#define BLOCKMETA_SERVER_NBD_REFUSAL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace blockmeta {
namespace nbd {

class Refusal {
 public:
  static constexpr int kMaxOptions = 16;
  static constexpr uint32_t kMaxOptionLength = 64 * 1024;

  explicit Refusal(std::string message);

  // The 18-byte fixed newstyle greeting, sent first.
  std::string Greeting() const;
  // Consumes client bytes; appends the bytes to send to *out. Returns
  // false when the connection must close (after *out is sent).
  bool Feed(std::string_view in, std::string* out);

 private:
  enum class State { kFlags, kOptionHeader, kOptionData, kDone };
  void Reply(uint32_t option, uint32_t type, std::string* out) const;

  const std::string message_;
  State state_ = State::kFlags;
  std::string pending_;  // bytes of the flags / option header so far
  uint32_t option_ = 0;
  uint64_t skip_ = 0;  // option payload bytes still to skip
  int options_ = 0;
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_REFUSAL_H_
