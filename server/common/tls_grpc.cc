// server/common/tls_grpc.cc — see tls_grpc.h.
#include "server/common/tls_grpc.h"

#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace blockmeta {

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>>
ReloadingServerCredentials(const TlsFiles& files,
                           unsigned int refresh_interval_seconds) {
  // Parse once now: precise start-up errors.
  absl::StatusOr<std::unique_ptr<TlsCredentials>> check =
      TlsCredentials::Create(files);
  if (!check.ok()) return check.status();
  auto provider =
      std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
          files.key_file, files.cert_file, files.ca_file,
          refresh_interval_seconds < 1 ? 1 : refresh_interval_seconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!files.ca_file.empty()) {
    options.watch_root_certs();
    options.set_cert_request_type(
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace blockmeta
