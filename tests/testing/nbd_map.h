// tests/testing/nbd_map.h — test support: the reference answers of the
// standard tools (`nbdinfo --map --json`, `nbdinfo --json`,
// `qemu-img map --output=json`) as blockmeta types, to compare against.
//
// Parsing uses protobuf's JSON parser into the messages of
// tool_output.proto (not google.protobuf.Struct: its inline map code
// misbehaves under --config=tsan against Debian's uninstrumented protobuf).
// Thread-safety: all functions are thread-safe. Each run spawns one process.
#ifndef BLOCKMETA_TESTS_TESTING_NBD_MAP_H_
#define BLOCKMETA_TESTS_TESTING_NBD_MAP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/cache/extent.h"

namespace blockmeta::testing {

// Parses `nbdinfo --map --json` output: [{"offset","length","type",...}].
absl::StatusOr<ExtentList> ParseNbdinfoMapJson(const std::string& json);
// Parses `qemu-img map --output=json` output into base:allocation flags as
// qemu-nbd reports them: HOLE when !data, ZERO when zero.
absl::StatusOr<ExtentList> ParseQemuImgMapJson(const std::string& json);

// Runs `nbdinfo --map[=CONTEXT] --json URI`.
absl::StatusOr<ExtentList> NbdinfoMap(
    const std::string& uri, const std::string& context = "base:allocation");
// Runs `qemu-img map --output=json -f FORMAT PATH`.
absl::StatusOr<ExtentList> QemuImgMap(const std::string& path,
                                      const std::string& format);

// What `nbdinfo --json URI` says about the (first) export.
struct NbdinfoExport {
  uint64_t size = 0;
  bool read_only = false;
  bool can_multi_conn = false;
  std::vector<std::string> contexts;
  uint32_t minimum_block_size = 0;  // 0 when not reported
  uint32_t preferred_block_size = 0;
  uint32_t maximum_block_size = 0;
};
absl::StatusOr<NbdinfoExport> ParseNbdinfoJson(const std::string& json);
absl::StatusOr<NbdinfoExport> Nbdinfo(const std::string& uri);

// Merges adjacent extents with equal flags (tools differ in whether they
// merge, so compare merged lists).
ExtentList MergeAdjacent(const ExtentList& extents);

// Keeps the part of `extents` inside [offset, offset + length), clipped.
ExtentList Slice(const ExtentList& extents, uint64_t offset, uint64_t length);

}  // namespace blockmeta::testing

#endif  // BLOCKMETA_TESTS_TESTING_NBD_MAP_H_
