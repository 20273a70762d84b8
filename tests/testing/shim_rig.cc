// tests/testing/shim_rig.cc — see shim_rig.h.
#include "tests/testing/shim_rig.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/upstream/nbd_upstream.h"

namespace blockmeta {
namespace testing {

ShimRig::~ShimRig() {
  if (server) server->Shutdown();
  server.reset();
  cache.reset();
  upstream.reset();
  process.reset();
}

std::string ShimRig::Uri() const {
  return absl::StrCat("nbd+unix:///", export_name, "?socket=", sock);
}

absl::StatusOr<std::unique_ptr<ShimRig>> StartShimRig(
    std::vector<std::string> argv, const std::string& export_name,
    const blockmeta::v1::NbdShimConfig& shim,
    const ExtentCache::Options& cache_options) {
  auto rig = std::make_unique<ShimRig>();
  rig->export_name = export_name;
  rig->dir = std::make_unique<TempDir>();
  auto proc = NbdProcess::Start(std::move(argv));
  if (!proc.ok()) return proc.status();
  rig->process = *std::move(proc);
  blockmeta::v1::ExportConfig config;
  config.set_name(export_name);
  config.set_nbd_uri(rig->process->uri());
  auto up = CreateUpstream(config);
  if (!up.ok()) return up.status();
  rig->upstream = *std::move(up);
  if (!rig->upstream->WaitReady(absl::Now() + absl::Seconds(20))) {
    return absl::UnavailableError(
        absl::StrCat("upstream not ready: ", rig->upstream->LastError()));
  }
  rig->cache = std::make_unique<ExtentCache>(cache_options);
  rig->server = std::make_unique<NbdServer>(
      std::vector<nbd::ShimExport>{
          {export_name, "", rig->upstream, false, absl::Seconds(30)}},
      rig->cache.get(), shim);
  rig->sock = rig->dir->File("shim.sock");
  absl::StatusOr<int> port = rig->server->Start("", rig->sock);
  if (!port.ok()) return port.status();
  return rig;
}

}  // namespace testing
}  // namespace blockmeta
