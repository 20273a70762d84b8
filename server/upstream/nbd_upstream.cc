// server/upstream/nbd_upstream.cc — see nbd_upstream.h: the factory of
// libnbd upstreams (which server to spawn, what to learn from an image
// first) and its test hooks. The implementation is split along its
// classes: nbd_op (one command), nbd_conn (one handle), nbd_core (the pool)
// and nbd_upstream_impl (the Upstream facade).
#include "server/upstream/nbd_upstream.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/common/log.h"
#include "server/upstream/image_probe.h"
#include "server/upstream/nbd_core.h"
#include "server/upstream/nbd_engine.h"
#include "server/upstream/nbd_upstream_impl.h"
#include "server/upstream/spawned_server.h"

namespace blockmeta {

std::string ImageFormat(const blockmeta::v1::ImageUpstream& image) {
  if (!image.format().empty()) return image.format();
  return absl::EndsWith(image.path(), ".qcow2") ? "qcow2" : "raw";
}

std::vector<std::string> QemuNbdArgv(const blockmeta::v1::ImageUpstream& image,
                                     bool read_only) {
  std::vector<std::string> argv = {"qemu-nbd", "-f", ImageFormat(image),
                                   "--shared=0", "--persistent"};
  if (read_only || image.read_only()) argv.push_back("--read-only");
  for (const std::string& b : image.bitmaps()) {
    argv.push_back("-B");
    argv.push_back(b);
  }
  argv.push_back("--");
  argv.push_back(image.path());
  return argv;
}

// The unit a write may change in a qcow2 image: the largest of its cluster
// size and its bitmaps' granularities (qemu-img info); 0 for raw images or
// when the probe fails (the shim then keeps its configured granularity).
namespace {

uint64_t LearnChangeGranularity(const blockmeta::v1::ExportConfig& config) {
  if (ImageFormat(config.image()) != "qcow2") return 0;
  absl::StatusOr<ImageGranularity> g =
      ProbeQcow2Granularity(config.image().path());
  if (!g.ok()) {
    LogWarning("image_probe_failed",
               {{"export", config.name()},
                {"reason", g.status().ToString().substr(0, 256)}});
    return 0;
  }
  LogInfo(
      "image_probed",
      {{"export", config.name()},
       {"cluster_size", static_cast<uint64_t>(g->cluster_size)},
       {"bitmap_granularity", static_cast<uint64_t>(g->bitmap_granularity)}});
  return g->Max();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Upstream>> CreateUpstream(
    const blockmeta::v1::ExportConfig& config) {
  std::unique_ptr<SpawnedServer> server;
  uint64_t change_granularity = 0;
  switch (config.upstream_case()) {
    case blockmeta::v1::ExportConfig::kNbdUri:
      break;
    case blockmeta::v1::ExportConfig::kImage: {
      change_granularity = LearnChangeGranularity(config);
      auto s = SpawnedServer::Create(
          QemuNbdArgv(config.image(), config.read_only() || config.immutable()),
          config.name());
      if (!s.ok()) return s.status();
      server = std::move(*s);
      break;
    }
    case blockmeta::v1::ExportConfig::kCommand: {
      auto s = SpawnedServer::Create(
          {config.command().argv().begin(), config.command().argv().end()},
          config.name());
      if (!s.ok()) return s.status();
      server = std::move(*s);
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("export ", config.name(), ": no upstream set"));
  }
  return std::unique_ptr<Upstream>(new upstream_internal::NbdUpstream(
      std::make_shared<upstream_internal::Core>(config, std::move(server),
                                                NbdEngine::Default()),
      change_granularity));
}

pid_t SpawnedServerPidForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<upstream_internal::NbdUpstream*>(upstream);
  return u != nullptr ? u->ServerPid() : -1;
}

std::string SpawnedServerSocketForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<upstream_internal::NbdUpstream*>(upstream);
  return u != nullptr ? u->ServerSocket() : "";
}

int LiveConnectionsForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<upstream_internal::NbdUpstream*>(upstream);
  return u != nullptr ? u->LiveConnections() : -1;
}

int UpstreamEngineThreads() { return NbdEngine::Default().threads(); }

}  // namespace blockmeta
