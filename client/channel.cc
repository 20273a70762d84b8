// client/channel.cc — see channel.h.
#include "client/channel.h"

#include <cerrno>
#include <fstream>
#include <sstream>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/errno_text.h"
#include "common/quote.h"

namespace blockmeta::client {
namespace {

absl::StatusOr<std::string> ReadPemFile(const std::string& path,
                                        const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    int err = errno;
    std::string msg = absl::StrCat("cannot read ", what, " ",
                                   QuoteBounded(path), ": ", ErrnoText(err));
    if (err == EACCES) return absl::PermissionDeniedError(msg);
    return absl::NotFoundError(msg);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ClientOptions& options, int channel_id) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls.enabled) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls.ca_file.empty()) {
      auto ca = ReadPemFile(options.tls.ca_file, "TLS CA file");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *std::move(ca);
    }
    if (!options.tls.cert_file.empty()) {
      auto cert = ReadPemFile(options.tls.cert_file, "TLS certificate file");
      if (!cert.ok()) return cert.status();
      auto key = ReadPemFile(options.tls.key_file, "TLS key file");
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  args.SetMaxReceiveMessageSize(64 << 20);
  if (!options.tls.server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls.server_name);
  }
  if (channel_id > 0) {
    // Distinct channel args give a distinct subchannel, hence a distinct
    // connection.
    args.SetInt("blockmeta.channel_id", channel_id);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  }
  return grpc::CreateCustomChannel(options.target, creds, args);
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::Status MarkIfUnreachable(absl::Status status, grpc::Channel& channel) {
  if (status.code() == absl::StatusCode::kUnavailable &&
      channel.GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
    status.SetPayload(kUnreachablePayload, absl::Cord("1"));
  }
  return status;
}

absl::Status FromGrpcCall(const grpc::Status& status, grpc::Channel& channel) {
  return MarkIfUnreachable(FromGrpcStatus(status), channel);
}

std::chrono::system_clock::time_point DeadlineFromNow(absl::Duration d) {
  return absl::ToChronoTime(absl::Now() + d);
}

}  // namespace blockmeta::client
