// client/client_options.h — how a blockmeta client reaches its server:
// target, TLS / mutual TLS, deadlines and the retry policy of streaming
// maps. Plain data; no gRPC types.
#ifndef BLOCKMETA_CLIENT_CLIENT_OPTIONS_H_
#define BLOCKMETA_CLIENT_CLIENT_OPTIONS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace blockmeta::client {

// TLS settings. TLS is used when `enabled` is true. File paths are read at
// Connect() time.
struct TlsOptions {
  bool enabled = false;
  // PEM CA bundle that signs the server's certificate; empty means the
  // system roots.
  std::string ca_file;
  // PEM client certificate chain and private key, for mutual TLS. Both or
  // neither.
  std::string cert_file;
  std::string key_file;
  // Overrides the name checked against the server certificate (tests,
  // connecting by IP address). Empty: the host part of the target.
  std::string server_name;
};

// Retries of ExtentIterator after transient errors (UNAVAILABLE,
// DEADLINE_EXCEEDED of one batch, RESOURCE_EXHAUSTED, ABORTED, a reset
// stream). The attempt counter restarts whenever a batch arrives, so a long
// map survives any number of spaced-out hiccups but not a dead server.
struct RetryPolicy {
  // Consecutive failed attempts after which the error is final (>= 1; 1
  // means no retry).
  int max_attempts = 5;
  // Backoff before retry n (n >= 1) is min(initial * 2^(n-1), max), with
  // +-20% jitter.
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(2);
};

struct ClientOptions {
  // "host:port", "[v6addr]:port", "dns:///host:port" or "unix:PATH".
  std::string target = "localhost:50051";
  TlsOptions tls;
  // Deadline of each unary call, and the longest wait for any one batch of
  // a streaming map (so a map of any size works, but a stalled stream is
  // detected).
  absl::Duration deadline = absl::Seconds(30);
  RetryPolicy retry;
};

// Checks the options without touching the network: a well-formed target,
// positive deadline, sane retry policy, cert and key given together.
// INVALID_ARGUMENT with a message naming the problem.
absl::Status ValidateOptions(const ClientOptions& options);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_CLIENT_OPTIONS_H_
