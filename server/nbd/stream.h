// server/nbd/stream.h — the byte stream the NBD shim reads and writes.
//
// ByteStream abstracts a connected socket so the handshake and request
// parser can run over memory (unit tests, the fuzzer) as well as over a
// file descriptor. FdStream adds an optional deadline (the handshake
// timeout): a read that cannot complete by then fails with
// DEADLINE_EXCEEDED instead of blocking.
//
// Errors: UNAVAILABLE when the peer closed or the socket broke (a clean EOF
// at a message boundary is still an error: callers decide), DEADLINE_EXCEEDED
// when the deadline passed.
// Thread-safety: one reader and one writer may use an FdStream at the same
// time (the connection serializes writers with its own mutex); a
// MemoryStream is single-threaded.
#ifndef BLOCKMETA_SERVER_NBD_STREAM_H_
#define BLOCKMETA_SERVER_NBD_STREAM_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace blockmeta {
namespace nbd {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Reads exactly n bytes or fails.
  virtual absl::Status ReadFull(void* buf, size_t n) = 0;
  // Writes all n bytes or fails.
  virtual absl::Status WriteAll(const void* buf, size_t n) = 0;
  absl::Status WriteAll(std::string_view s) {
    return WriteAll(s.data(), s.size());
  }
  // Reads and throws away n bytes in bounded chunks (never allocates n).
  absl::Status Discard(uint64_t n);
};

// A socket. Does not own the fd unless `owns` is true.
class FdStream : public ByteStream {
 public:
  explicit FdStream(int fd, bool owns = false) : fd_(fd), owns_(owns) {}
  ~FdStream() override;
  FdStream(const FdStream&) = delete;
  FdStream& operator=(const FdStream&) = delete;

  absl::Status ReadFull(void* buf, size_t n) override;
  absl::Status WriteAll(const void* buf, size_t n) override;
  using ByteStream::WriteAll;
  // Reads after this instant fail with DEADLINE_EXCEEDED. InfiniteFuture()
  // (the default) disables the deadline.
  void SetReadDeadline(absl::Time deadline) { deadline_ = deadline; }
  int fd() const { return fd_; }

 private:
  const int fd_;
  const bool owns_;
  absl::Time deadline_ = absl::InfiniteFuture();  // reader thread only
};

// Reads from a fixed input, collects what is written. Reading past the end
// of the input fails with UNAVAILABLE (like a peer hang-up).
class MemoryStream : public ByteStream {
 public:
  explicit MemoryStream(std::string_view input) : input_(input) {}
  absl::Status ReadFull(void* buf, size_t n) override;
  absl::Status WriteAll(const void* buf, size_t n) override;
  using ByteStream::WriteAll;
  const std::string& output() const { return output_; }
  size_t remaining() const { return input_.size() - pos_; }

 private:
  std::string_view input_;
  size_t pos_ = 0;
  std::string output_;
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_STREAM_H_
