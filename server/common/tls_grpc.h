// server/common/tls_grpc.h — gRPC server TLS credentials that follow
// certificate rotation: the same PEM files as tls_credentials.h, watched
// by gRPC's own FileWatcherCertificateProvider (grpc++ 1.51
// grpc::experimental), so a renewed certificate or client CA is used by
// new connections without a restart.
//
// The files are checked once here with GnuTLS (TlsCredentials::Create), so
// a bad path or a malformed PEM fails start-up with a precise message
// instead of failing every later handshake. With a client CA, clients must
// present a certificate it signed (mutual TLS).
// Thread-safety: the returned credentials are thread-safe (gRPC's).
#ifndef BLOCKMETA_SERVER_COMMON_TLS_GRPC_H_
#define BLOCKMETA_SERVER_COMMON_TLS_GRPC_H_

#include <memory>

#include "absl/status/statusor.h"
#include "grpcpp/security/server_credentials.h"
#include "server/common/tls_credentials.h"

namespace blockmeta {

// INVALID_ARGUMENT when a file cannot be read or parsed.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>>
ReloadingServerCredentials(const TlsFiles& files,
                           unsigned int refresh_interval_seconds = 5);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_TLS_GRPC_H_
