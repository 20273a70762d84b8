// bench/shim_bench_server.cc — a bench-only NBD shim process: one export
// whose upstream is an NBD URI (through the libnbd Upstream), the shared
// ExtentCache and the NbdServer on a Unix socket. No gRPC, so the shim
// benchmark measures the shim alone. Used by bench/shim_map_bench.sh.
//
//   shim_bench_server --upstream=URI --export=NAME --socket=PATH
//
// Prints "ready" on stdout once the upstream is connected and the socket
// listens; runs until SIGINT/SIGTERM; then prints the cache counters.
#include <csignal>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/config.pb.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/nbd_upstream.h"

ABSL_FLAG(std::string, upstream, "", "NBD URI of the upstream export");
ABSL_FLAG(std::string, export, "disk", "Export name served by the shim");
ABSL_FLAG(std::string, socket, "", "Unix socket the shim listens on");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // threads inherit the mask

  blockmeta::v1::ExportConfig config;
  config.set_name(absl::GetFlag(FLAGS_export));
  config.set_nbd_uri(absl::GetFlag(FLAGS_upstream));
  auto upstream = blockmeta::CreateUpstream(config);
  if (!upstream.ok()) {
    std::cerr << upstream.status() << "\n";
    return 1;
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (!(*upstream)->Ready() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  if (!(*upstream)->Ready()) {
    std::cerr << "upstream not ready: " << (*upstream)->LastError() << "\n";
    return 1;
  }
  blockmeta::ExtentCache cache(blockmeta::ExtentCache::Options{});
  std::vector<blockmeta::nbd::ShimExport> exports = {
      {config.name(), "", upstream->get(), false, absl::Seconds(60)}};
  blockmeta::NbdServer server(std::move(exports), &cache,
                              blockmeta::v1::NbdShimConfig());
  auto port = server.Start("", absl::GetFlag(FLAGS_socket));
  if (!port.ok()) {
    std::cerr << port.status() << "\n";
    return 1;
  }
  std::cout << "ready" << std::endl;
  int sig = 0;
  sigwait(&set, &sig);
  server.Shutdown();
  blockmeta::CacheCounters c = cache.Counters();
  std::cout << "cache hits=" << c.hits << " partial=" << c.partial_hits
            << " misses=" << c.misses << " upstream_calls=" << c.upstream_calls
            << std::endl;
  return 0;
}
