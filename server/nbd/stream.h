// server/nbd/stream.h — the byte stream the NBD shim reads and writes.
//
// ByteStream abstracts a connected socket so the handshake and request
// parser can run over memory (unit tests, the fuzzer) as well as over a
// file descriptor. FdStream adds a read and a write deadline (the
// handshake timeout): a read or write that cannot complete by then fails
// with DEADLINE_EXCEEDED instead of blocking, so no peer can park a thread
// in recv() or send() (a client that floods options and never reads the
// replies fills its socket buffer). TryRead and TryWrite never block: the
// transmission phase receives requests incrementally and queues what the
// socket does not take, both driven by its poll loop, so reading a request
// never waits for a reply to be taken, nor a reply for a request.
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
#include "absl/status/statusor.h"
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
  // Reads what can be read now without blocking, at most n > 0 bytes;
  // returns the count (0 when nothing is available yet). A peer that
  // closed is an error (UNAVAILABLE), not 0. The default reads n bytes.
  virtual absl::StatusOr<size_t> TryRead(void* buf, size_t n) {
    absl::Status s = ReadFull(buf, n);
    if (!s.ok()) return s;
    return n;
  }
  // Writes what can be written now without blocking; returns the count
  // (0 when the socket is full). The default writes everything.
  virtual absl::StatusOr<size_t> TryWrite(const void* buf, size_t n) {
    absl::Status s = WriteAll(buf, n);
    if (!s.ok()) return s;
    return n;
  }
  // True when input is already buffered above the socket (TLS records), so
  // a read may succeed although poll() says the socket is not readable.
  virtual bool HasBufferedInput() const { return false; }
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
  absl::StatusOr<size_t> TryRead(void* buf, size_t n) override;
  absl::StatusOr<size_t> TryWrite(const void* buf, size_t n) override;
  // One recv() / send() of at most n bytes, waiting for the socket until
  // the read / write deadline: the bytes moved (recv: 0 = EOF, an error).
  absl::StatusOr<size_t> ReadSome(void* buf, size_t n);
  absl::StatusOr<size_t> WriteSome(const void* buf, size_t n);
  // Reads / writes after this instant fail with DEADLINE_EXCEEDED.
  // InfiniteFuture() (the default) disables the deadline.
  void SetReadDeadline(absl::Time deadline) { read_deadline_ = deadline; }
  void SetWriteDeadline(absl::Time deadline) { write_deadline_ = deadline; }
  int fd() const { return fd_; }

 private:
  // Waits until `events` is ready on the fd or `deadline` passed.
  absl::Status WaitFor(int16_t events, absl::Time deadline);

  const int fd_;
  const bool owns_;
  absl::Time read_deadline_ = absl::InfiniteFuture();   // reader thread only
  absl::Time write_deadline_ = absl::InfiniteFuture();  // writer only
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
