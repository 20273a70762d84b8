// server/nbd/tls_stream.h — a GnuTLS server session over an FdStream: the
// byte stream of an NBD session after NBD_OPT_STARTTLS.
//
// Every socket read and write goes through the FdStream, so its read and
// write deadlines bound the TLS handshake and every record, as they bound
// plaintext (no peer can park a thread in a TLS handshake either).
// TryRead and TryWrite never block: a record only partly received stays
// buffered in GnuTLS until the next TryRead; a record the socket does not
// take stays buffered in GnuTLS and is finished by the next
// TryWrite/WriteAll, which the caller makes with the same bytes (GnuTLS's
// E_AGAIN contract).
//
// Client certificates: with a CA in the credentials they are requested and
// verified against it; `require_client_cert` refuses clients without one.
// Thread-safety: one reader and one writer at a time, concurrently (GnuTLS
// allows a send and a receive in parallel on one session).
#ifndef BLOCKMETA_SERVER_NBD_TLS_STREAM_H_
#define BLOCKMETA_SERVER_NBD_TLS_STREAM_H_

#include <gnutls/gnutls.h>

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/common/tls_credentials.h"
#include "server/nbd/stream.h"

namespace blockmeta {
namespace nbd {

class TlsStream : public ByteStream {
 public:
  // Runs the server handshake on `transport` (which must outlive this).
  // UNAUTHENTICATED when the client certificate is missing or not signed
  // by the CA; UNAVAILABLE / DEADLINE_EXCEEDED when the socket failed.
  static absl::StatusOr<std::unique_ptr<TlsStream>> Accept(
      FdStream* transport, TlsCredentials::Credentials credentials,
      bool verify_client, bool require_client_cert);
  ~TlsStream() override;
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  absl::Status ReadFull(void* buf, size_t n) override;
  absl::Status WriteAll(const void* buf, size_t n) override;
  using ByteStream::WriteAll;
  absl::StatusOr<size_t> TryRead(void* buf, size_t n) override;
  absl::StatusOr<size_t> TryWrite(const void* buf, size_t n) override;
  bool HasBufferedInput() const override;
  // The verified client certificate's subject DN ("" when none).
  const std::string& peer() const { return peer_; }

 private:
  TlsStream(FdStream* transport, TlsCredentials::Credentials credentials)
      : transport_(transport), credentials_(std::move(credentials)) {}
  static ssize_t Pull(gnutls_transport_ptr_t p, void* buf, size_t n);
  static ssize_t Push(gnutls_transport_ptr_t p, const void* buf, size_t n);
  static int PullTimeout(gnutls_transport_ptr_t p, unsigned int ms);
  absl::Status Error(int rc, const char* what) const;

  FdStream* const transport_;
  const TlsCredentials::Credentials credentials_;  // outlives session_
  gnutls_session_t session_ = nullptr;
  std::string peer_;
  // Reader side only.
  bool read_nonblocking_ = false;  // Pull: never wait for the socket
  // Writer side only.
  bool nonblocking_ = false;  // Push: never wait for the socket
  size_t pending_ = 0;        // bytes of a record GnuTLS holds (E_AGAIN)
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_TLS_STREAM_H_
