// client/client_options.cc — see client_options.h.
#include "client/client_options.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/quote.h"

namespace blockmeta::client {

absl::Status ValidateOptions(const ClientOptions& options) {
  const std::string& t = options.target;
  if (t.empty()) {
    return absl::InvalidArgumentError("empty server address");
  }
  if (absl::StartsWith(t, "unix:")) {
    if (t.size() == 5) {
      return absl::InvalidArgumentError(
          "server address \"unix:\" has no socket path (use unix:PATH)");
    }
    // sockaddr_un.sun_path holds 108 bytes including the terminator.
    if (t.size() - 5 > 107 && !absl::StartsWith(t, "unix:///")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Unix socket path is longer than 107 bytes: ", t.substr(5)));
    }
  } else if (!absl::StrContains(t, "://")) {
    // host:port; the port is what follows the last ':' (after a ']' for
    // bracketed IPv6 literals).
    size_t colon = t.rfind(':');
    size_t bracket = t.rfind(']');
    if (colon == std::string::npos ||
        (bracket != std::string::npos && colon < bracket)) {
      return absl::InvalidArgumentError(
          absl::StrCat("server address ", QuoteBounded(t),
                       " has no port (use host:port or unix:PATH)"));
    }
    std::string port = t.substr(colon + 1);
    if (port.empty() ||
        port.find_first_not_of("0123456789") != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("server address ", QuoteBounded(t),
                       " has an invalid port ", QuoteBounded(port)));
    }
    if (colon == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("server address ", QuoteBounded(t), " has no host"));
    }
  }
  if (options.deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("deadline must be > 0");
  }
  if (options.retry.max_attempts < 1) {
    return absl::InvalidArgumentError("retry.max_attempts must be >= 1");
  }
  if (options.retry.initial_backoff < absl::ZeroDuration() ||
      options.retry.max_backoff < options.retry.initial_backoff) {
    return absl::InvalidArgumentError(
        "retry backoff must satisfy 0 <= initial <= max");
  }
  const TlsOptions& tls = options.tls;
  if (!tls.enabled && (!tls.ca_file.empty() || !tls.cert_file.empty() ||
                       !tls.key_file.empty())) {
    return absl::InvalidArgumentError("TLS files given but TLS is not enabled");
  }
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs its key and a key its certificate "
        "(give both --tls-cert and --tls-key)");
  }
  return absl::OkStatus();
}

}  // namespace blockmeta::client
