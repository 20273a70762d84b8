// server/common/tls_credentials.h — X.509 certificate files loaded into
// GnuTLS credentials, reloaded when the files change (certificate
// rotation without a restart). Used by the NBD shim's STARTTLS; gRPC
// reloads the same files with its own provider (tls_grpc.h).
//
// Get() stats the files (at most once per `recheck`) and, when any
// changed (inode, size or mtime), loads them again. A load that fails
// (a half-written rotation) keeps the last good credentials and logs; the
// next Get() after another change retries. Credentials are handed out as
// shared_ptr: a session keeps the ones it started with until it ends, as
// GnuTLS requires.
//
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_COMMON_TLS_CREDENTIALS_H_
#define BLOCKMETA_SERVER_COMMON_TLS_CREDENTIALS_H_

#include <gnutls/gnutls.h>
#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/common/mutex.h"

namespace blockmeta {

struct TlsFiles {
  std::string cert_file;  // PEM certificate chain (required)
  std::string key_file;   // PEM private key (required)
  std::string ca_file;    // PEM CA bundle for client certificates ("" = none)
};

class TlsCredentials {
 public:
  using Credentials = std::shared_ptr<gnutls_certificate_credentials_st>;

  // Loads the files once; INVALID_ARGUMENT (naming the file) when they
  // cannot be read or parsed.
  static absl::StatusOr<std::unique_ptr<TlsCredentials>> Create(
      TlsFiles files, absl::Duration recheck = absl::Seconds(1));

  // The current credentials, reloaded first if the files changed.
  Credentials Get() ABSL_LOCKS_EXCLUDED(mu_);
  // How many times the files were loaded (1 after Create).
  int loads() const ABSL_LOCKS_EXCLUDED(mu_);
  const TlsFiles& files() const { return files_; }

 private:
  TlsCredentials(TlsFiles files, absl::Duration recheck)
      : files_(std::move(files)), recheck_(recheck) {}
  static absl::StatusOr<Credentials> Load(const TlsFiles& files);
  std::string Stamps() const;

  // Constant after construction.
  const TlsFiles files_;
  const absl::Duration recheck_;

  mutable sync::Mutex mu_;
  Credentials current_ ABSL_GUARDED_BY(mu_);
  std::string stamps_ ABSL_GUARDED_BY(mu_);  // of the files last loaded
  absl::Time checked_ ABSL_GUARDED_BY(mu_);
  int loads_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_TLS_CREDENTIALS_H_
