// client/channel.h — internal: builds the gRPC channel for ClientOptions and
// converts gRPC statuses. Shared by the client library and the load
// generator; not part of the public API (gRPC types appear here).
#ifndef BLOCKMETA_CLIENT_CHANNEL_H_
#define BLOCKMETA_CLIENT_CHANNEL_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client_options.h"

namespace blockmeta::client {

// Validates `options`, reads the TLS files and creates a channel (lazily
// connecting; no network I/O here). `channel_id` > 0 forces a separate TCP
// connection from other channels to the same target (load generation).
// Reconnect backoff is short (first retry after 100 ms, at most 2 s apart)
// so a restarted server is seen quickly; the connect timeout stays gRPC's
// default (20 s, bounded by each call's deadline). INVALID_ARGUMENT for bad
// options, NOT_FOUND / PERMISSION_DENIED for unreadable TLS files.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ClientOptions& options, int channel_id = 0);

// Same code (the numeric values agree) and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// The payload (type URL) that marks an UNAVAILABLE no server sent: see
// IsServerUnreachable in blockmeta_client.h.
inline constexpr char kUnreachablePayload[] =
    "type.googleapis.com/blockmeta.client.ServerUnreachable";

// For a call made on `channel` that failed with `status`: an UNAVAILABLE
// while the channel is not connected (READY) never came from a server (the
// connection was refused or failed, or the server went away), and is marked
// with kUnreachablePayload. An UNAVAILABLE over a connected channel is the
// server's own answer (e.g. its upstream is down) and is returned as is.
absl::Status MarkIfUnreachable(absl::Status status, grpc::Channel& channel);

// MarkIfUnreachable(FromGrpcStatus(status), channel).
absl::Status FromGrpcCall(const grpc::Status& status, grpc::Channel& channel);

// now + d as a gRPC deadline.
std::chrono::system_clock::time_point DeadlineFromNow(absl::Duration d);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_CHANNEL_H_
