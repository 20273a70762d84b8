// tests/testing/shim_rig.h — a real NBD server process (nbdkit, qemu-nbd)
// served through an in-process NBD shim, for the shim's integration tests.
//
// StartShimRig starts the upstream process (argv with "{sock}", as
// NbdProcess::Start), connects a libnbd Upstream to it and waits until it
// is ready, makes an ExtentCache and an NbdServer serving that one export
// on a Unix socket in the rig's own TempDir. The destructor shuts the shim
// down first, then frees the cache, the Upstream and the process, in that
// order, so no part outlives what it uses.
#ifndef BLOCKMETA_TESTS_TESTING_SHIM_RIG_H_
#define BLOCKMETA_TESTS_TESTING_SHIM_RIG_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "blockmeta/v1/config.pb.h"
#include "server/cache/extent_cache.h"
#include "server/nbd/nbd_server.h"
#include "server/upstream/upstream.h"
#include "tests/testing/nbd_process.h"

namespace blockmeta {
namespace testing {

struct ShimRig {
  ShimRig() = default;
  ShimRig(const ShimRig&) = delete;
  ShimRig& operator=(const ShimRig&) = delete;
  ~ShimRig();

  // nbd+unix:///EXPORT?socket=SHIM-SOCKET
  std::string Uri() const;

  std::string export_name;
  std::unique_ptr<TempDir> dir;  // holds the shim's socket
  std::unique_ptr<NbdProcess> process;
  std::shared_ptr<Upstream> upstream;  // the shim holds a weak reference
  std::unique_ptr<ExtentCache> cache;
  std::unique_ptr<NbdServer> server;
  std::string sock;  // the shim's Unix socket
};

// Serves `argv` as export `export_name` through a shim configured by
// `shim` (upstream_timeout 30 s, writable).
absl::StatusOr<std::unique_ptr<ShimRig>> StartShimRig(
    std::vector<std::string> argv, const std::string& export_name,
    const blockmeta::v1::NbdShimConfig& shim = {},
    const ExtentCache::Options& cache_options = {});

}  // namespace testing
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_SHIM_RIG_H_
