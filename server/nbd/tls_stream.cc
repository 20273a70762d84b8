// server/nbd/tls_stream.cc — GnuTLS over FdStream (see tls_stream.h).
#include "server/nbd/tls_stream.h"

#include <gnutls/x509.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"

namespace blockmeta {
namespace nbd {

ssize_t TlsStream::Pull(gnutls_transport_ptr_t p, void* buf, size_t n) {
  auto* self = static_cast<TlsStream*>(p);
  if (self->read_nonblocking_) {
    absl::StatusOr<size_t> r = self->transport_->TryRead(buf, n);
    if (r.ok() && *r > 0) return static_cast<ssize_t>(*r);
    if (!r.ok()) return 0;  // EOF (or a broken socket: the next read says)
    gnutls_transport_set_errno(self->session_, EAGAIN);
    return -1;
  }
  absl::StatusOr<size_t> r = self->transport_->ReadSome(buf, n);
  if (r.ok()) return static_cast<ssize_t>(*r);  // 0 = EOF
  gnutls_transport_set_errno(
      self->session_, absl::IsDeadlineExceeded(r.status()) ? ETIMEDOUT : EIO);
  return -1;
}

ssize_t TlsStream::Push(gnutls_transport_ptr_t p, const void* buf, size_t n) {
  auto* self = static_cast<TlsStream*>(p);
  absl::StatusOr<size_t> r = self->nonblocking_
                                 ? self->transport_->TryWrite(buf, n)
                                 : self->transport_->WriteSome(buf, n);
  if (r.ok() && *r > 0) return static_cast<ssize_t>(*r);
  int err = EIO;
  if (r.ok()) {
    err = EAGAIN;  // non-blocking and the socket is full
  } else if (absl::IsDeadlineExceeded(r.status())) {
    err = ETIMEDOUT;
  }
  gnutls_transport_set_errno(self->session_, err);
  return -1;
}

int TlsStream::PullTimeout(gnutls_transport_ptr_t p, unsigned int ms) {
  // Only used by GnuTLS for DTLS and handshake timeouts; the transport's
  // deadline bounds reads already, so say "readable" and let Pull wait.
  (void)p;
  (void)ms;
  return 1;
}

absl::Status TlsStream::Error(int rc, const char* what) const {
  return absl::UnavailableError(
      absl::StrCat("TLS ", what, ": ", gnutls_strerror(rc)));
}

absl::StatusOr<std::unique_ptr<TlsStream>> TlsStream::Accept(
    FdStream* transport, TlsCredentials::Credentials credentials,
    bool verify_client, bool require_client_cert) {
  std::unique_ptr<TlsStream> t(
      new TlsStream(transport, std::move(credentials)));
  if (int rc = gnutls_init(&t->session_, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
      rc < 0) {
    t->session_ = nullptr;
    return absl::InternalError(gnutls_strerror(rc));
  }
  gnutls_session_t s = t->session_;
  if (int rc = gnutls_set_default_priority(s); rc < 0) {
    return absl::InternalError(gnutls_strerror(rc));
  }
  if (int rc = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE,
                                      t->credentials_.get());
      rc < 0) {
    return absl::InternalError(gnutls_strerror(rc));
  }
  if (verify_client) {
    gnutls_certificate_server_set_request(
        s, require_client_cert ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_REQUEST);
    gnutls_session_set_verify_cert(s, nullptr, 0);  // verify against the CA
  } else {
    gnutls_certificate_server_set_request(s, GNUTLS_CERT_IGNORE);
  }
  gnutls_transport_set_ptr(s, t.get());
  gnutls_transport_set_pull_function(s, &TlsStream::Pull);
  gnutls_transport_set_push_function(s, &TlsStream::Push);
  gnutls_transport_set_pull_timeout_function(s, &TlsStream::PullTimeout);
  int rc;
  do {
    rc = gnutls_handshake(s);
  } while (rc < 0 && !gnutls_error_is_fatal(rc));
  if (rc < 0) {
    if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR ||
        rc == GNUTLS_E_CERTIFICATE_ERROR ||
        rc == GNUTLS_E_NO_CERTIFICATE_FOUND) {
      return absl::UnauthenticatedError(absl::StrCat(
          "TLS client certificate refused: ", gnutls_strerror(rc)));
    }
    return t->Error(rc, "handshake");
  }
  if (verify_client) {
    unsigned int list_size = 0;
    const gnutls_datum_t* certs = gnutls_certificate_get_peers(s, &list_size);
    if (certs != nullptr && list_size > 0) {
      gnutls_x509_crt_t crt;
      if (gnutls_x509_crt_init(&crt) == 0) {
        if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0) {
          char dn[512];
          size_t dn_size = sizeof dn;
          if (gnutls_x509_crt_get_dn(crt, dn, &dn_size) == 0) {
            t->peer_.assign(dn, std::min(dn_size, sizeof dn));
          }
        }
        gnutls_x509_crt_deinit(crt);
      }
    }
  }
  return t;
}

TlsStream::~TlsStream() {
  if (session_ != nullptr) gnutls_deinit(session_);
}

absl::Status TlsStream::ReadFull(void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = gnutls_record_recv(session_, p, n);
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) continue;
    if (r == 0) return absl::UnavailableError("peer closed the TLS session");
    if (r < 0) {
      if (gnutls_error_is_fatal(static_cast<int>(r)) == 0) continue;
      return Error(static_cast<int>(r), "read");
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> TlsStream::TryRead(void* buf, size_t n) {
  read_nonblocking_ = true;
  ssize_t r;
  do {
    r = gnutls_record_recv(session_, buf, n);
  } while (r < 0 && r != GNUTLS_E_AGAIN &&
           gnutls_error_is_fatal(static_cast<int>(r)) == 0);
  read_nonblocking_ = false;
  if (r > 0) return static_cast<size_t>(r);
  if (r == GNUTLS_E_AGAIN) return size_t{0};
  if (r == 0) return absl::UnavailableError("peer closed the TLS session");
  return Error(static_cast<int>(r), "read");
}

absl::StatusOr<size_t> TlsStream::TryWrite(const void* buf, size_t n) {
  nonblocking_ = true;
  ssize_t r;
  size_t len;
  if (pending_ > 0) {  // finish the record GnuTLS holds for these bytes
    len = pending_;
    r = gnutls_record_send(session_, nullptr, 0);
  } else {
    len = std::min<size_t>(n, 16384);  // one record
    r = gnutls_record_send(session_, buf, len);
  }
  nonblocking_ = false;
  if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
    pending_ = len;
    return size_t{0};
  }
  if (r < 0) return Error(static_cast<int>(r), "write");
  pending_ = 0;
  return static_cast<size_t>(r);
}

absl::Status TlsStream::WriteAll(const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0 || pending_ > 0) {
    ssize_t r;
    size_t len;
    if (pending_ > 0) {
      len = pending_;
      r = gnutls_record_send(session_, nullptr, 0);
    } else {
      len = n;
      r = gnutls_record_send(session_, p, n);
    }
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
      pending_ = len;
      continue;
    }
    if (r < 0) return Error(static_cast<int>(r), "write");
    pending_ = 0;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

bool TlsStream::HasBufferedInput() const {
  return gnutls_record_check_pending(session_) > 0;
}

}  // namespace nbd
}  // namespace blockmeta
