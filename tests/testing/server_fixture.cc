// tests/testing/server_fixture.cc — see server_fixture.h.
#include "tests/testing/server_fixture.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"

namespace blockmeta {
namespace testing {

namespace v1 = ::blockmeta::v1;

namespace {
constexpr absl::Duration kPoll = absl::Milliseconds(20);
}  // namespace

absl::StatusOr<std::unique_ptr<BlockMetaServer>> StartServer(
    const v1::ServerConfig& config) {
  auto server = BlockMetaServer::Create(config);
  if (!server.ok()) return server.status();
  if (absl::Status s = (*server)->Start(); !s.ok()) return s;
  return server;
}

std::shared_ptr<grpc::Channel> LoopbackChannel(const BlockMetaServer& server) {
  return grpc::CreateChannel(absl::StrCat("127.0.0.1:", server.grpc_port()),
                             grpc::InsecureChannelCredentials());
}

absl::Status WaitExportsReady(const std::shared_ptr<grpc::Channel>& channel,
                              int exports, absl::Duration timeout) {
  auto stub = v1::BlockMeta::NewStub(channel);
  const absl::Time give_up = absl::Now() + timeout;
  std::string last = "no answer";
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    v1::ListExportsResponse r;
    grpc::Status s = stub->ListExports(&ctx, {}, &r);
    if (s.ok()) {
      bool all =
          exports < 0 ? r.exports_size() > 0 : r.exports_size() == exports;
      for (const auto& e : r.exports()) {
        all = all && e.state() == v1::EXPORT_STATE_READY;
      }
      if (all) return absl::OkStatus();
      last = absl::StrCat(r.exports_size(), " exports, not all ready");
    } else {
      last = s.error_message();
    }
    if (absl::Now() >= give_up) break;
    absl::SleepFor(kPoll);
  }
  return absl::DeadlineExceededError(absl::StrCat("exports not ready within ",
                                                  absl::FormatDuration(timeout),
                                                  " (", last, ")"));
}

std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\n\r\n");
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, n);
  close(fd);
  return out;
}

std::optional<double> MetricSample(const std::string& exposition,
                                   const std::string& sample) {
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::ConsumePrefix(&line, sample) || !absl::ConsumePrefix(&line, " "))
      continue;
    // "value" or "value timestamp".
    double v;
    if (absl::SimpleAtod(line.substr(0, line.find(' ')), &v)) return v;
  }
  return std::nullopt;
}

absl::Status WaitMetricAtLeast(const BlockMetaServer& server,
                               const std::string& sample, double min,
                               absl::Duration timeout) {
  if (server.metrics_port() <= 0) {
    return absl::FailedPreconditionError("the server has no metrics_listen");
  }
  const absl::Time give_up = absl::Now() + timeout;
  std::optional<double> v;
  while (true) {
    v = MetricSample(HttpGet(server.metrics_port(), "/metrics"), sample);
    if (v.has_value() && *v >= min) return absl::OkStatus();
    if (absl::Now() >= give_up) break;
    absl::SleepFor(kPoll);
  }
  return absl::DeadlineExceededError(absl::StrCat(
      sample, " did not reach ", min, " within ", absl::FormatDuration(timeout),
      " (last: ", v.has_value() ? absl::StrCat(*v) : "absent", ")"));
}

namespace {
std::string CommandsTotal(const std::string& export_name) {
  return absl::StrCat("blockmeta_upstream_commands_total{export=\"",
                      export_name, "\"}");
}
}  // namespace

double UpstreamCommandsSent(const BlockMetaServer& server,
                            const std::string& export_name) {
  if (server.metrics_port() <= 0) return 0;
  return MetricSample(HttpGet(server.metrics_port(), "/metrics"),
                      CommandsTotal(export_name))
      .value_or(0);
}

absl::Status WaitUpstreamCommandsSent(const BlockMetaServer& server,
                                      const std::string& export_name,
                                      double before, absl::Duration timeout) {
  return WaitMetricAtLeast(server, CommandsTotal(export_name), before + 1,
                           timeout);
}

}  // namespace testing
}  // namespace blockmeta
