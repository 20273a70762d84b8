// tests/testing/server_fixture.h — test support: the steps every
// end-to-end test of the gRPC server repeats, against an in-process
// BlockMetaServer: create and start it, open a plaintext channel, wait
// until its exports are connected, and read its Prometheus /metrics (to
// wait on what the server is doing, e.g. a call in flight at the upstream,
// instead of sleeping).
//
// Every wait has a deadline and fails with a status naming what it waited
// for; none sleeps longer than one poll interval past its condition.
#ifndef BLOCKMETA_TESTS_TESTING_SERVER_FIXTURE_H_
#define BLOCKMETA_TESTS_TESTING_SERVER_FIXTURE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/blockmeta_server.h"

namespace blockmeta {
namespace testing {

// BlockMetaServer::Create(config), then Start().
absl::StatusOr<std::unique_ptr<BlockMetaServer>> StartServer(
    const blockmeta::v1::ServerConfig& config);

// A plaintext channel to the server's gRPC port on 127.0.0.1.
std::shared_ptr<grpc::Channel> LoopbackChannel(const BlockMetaServer& server);

// Waits until ListExports answers with `exports` exports (when -1: at
// least one), every one EXPORT_STATE_READY.
absl::Status WaitExportsReady(const std::shared_ptr<grpc::Channel>& channel,
                              int exports = -1,
                              absl::Duration timeout = absl::Seconds(20));

// Minimal HTTP/1.0 GET on loopback: the whole response (status line,
// headers, body), or "" when nothing listens.
std::string HttpGet(int port, const std::string& path);

// The value of one sample in a Prometheus text exposition, e.g.
// `blockmeta_upstream_commands_in_flight{export="slow"}`; nullopt if absent.
std::optional<double> MetricSample(const std::string& exposition,
                                   const std::string& sample);

// Waits until `sample` on the server's /metrics (config.metrics_listen
// must be set) is at least `min`.
absl::Status WaitMetricAtLeast(const BlockMetaServer& server,
                               const std::string& sample, double min,
                               absl::Duration timeout = absl::Seconds(20));

// The number of caller commands (not health probes) the export has sent
// to its upstream so far: blockmeta_upstream_commands_total{export} (0
// before the first, or when /metrics cannot be read).
double UpstreamCommandsSent(const BlockMetaServer& server,
                            const std::string& export_name);

// Waits until the export has sent more than `before` caller commands: a
// call made after `before` was read is now at the upstream (for a delayed
// upstream: waiting there). A counter, not the in-flight gauge, so a
// command left over from an earlier test cannot satisfy the wait.
absl::Status WaitUpstreamCommandsSent(
    const BlockMetaServer& server, const std::string& export_name,
    double before, absl::Duration timeout = absl::Seconds(20));

}  // namespace testing
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_SERVER_FIXTURE_H_
