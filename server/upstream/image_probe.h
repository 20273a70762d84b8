// server/upstream/image_probe.h — what blockmeta learns from an image file
// before it spawns qemu-nbd on it: the unit in which a write may change the
// image's block status (qcow2 cluster size) and its dirty bitmaps
// (granularity of each persistent bitmap), from
// `qemu-img info --output=json --force-share`.
//
// Invariants: the probe runs under a deadline (the child is SIGKILLed and
// reaped when it passes) and reads at most a bounded amount of output; it
// never returns a granularity smaller than one it found in the output (the
// maximum of every "cluster-size" and "granularity" key), so a caller that
// rounds invalidations out to it is never finer than the image. Any failure
// is an error: the caller then keeps its configured value.
// Thread-safety: the functions are reentrant.
#ifndef BLOCKMETA_SERVER_UPSTREAM_IMAGE_PROBE_H_
#define BLOCKMETA_SERVER_UPSTREAM_IMAGE_PROBE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace blockmeta {

// Runs argv (PATH lookup), stdin and stderr /dev/null, and returns its
// stdout. DEADLINE_EXCEEDED (child killed) past `deadline`,
// RESOURCE_EXHAUSTED (child killed) past `max_output` bytes, UNAVAILABLE
// when it cannot start or exits non-zero.
absl::StatusOr<std::string> RunBounded(const std::vector<std::string>& argv,
                                       absl::Time deadline, size_t max_output);

struct ImageGranularity {
  uint64_t cluster_size = 0;        // 0: the format has none (raw)
  uint64_t bitmap_granularity = 0;  // the largest; 0: no bitmaps
  // max(cluster_size, bitmap_granularity): a write changes block status
  // and every dirty bitmap only within this unit around it.
  uint64_t Max() const {
    return cluster_size > bitmap_granularity ? cluster_size
                                             : bitmap_granularity;
  }
};

// Parses `qemu-img info --output=json` of a qcow2 image: the largest
// "cluster-size" and the largest "granularity" anywhere in it (a key
// cannot occur inside a JSON string: its quotes would be escaped).
// INVALID_ARGUMENT when there is no cluster size.
absl::StatusOr<ImageGranularity> ParseQemuImgInfo(std::string_view json);

// Runs qemu-img info on a qcow2 image (`qemu_img`: the binary) within
// `timeout`, output bounded to 1 MiB.
absl::StatusOr<ImageGranularity> ProbeQcow2Granularity(
    const std::string& path, absl::Duration timeout = absl::Seconds(10),
    const std::string& qemu_img = "qemu-img");

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_IMAGE_PROBE_H_
