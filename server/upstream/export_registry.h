// server/upstream/export_registry.h — the configured exports and their
// upstreams, by name. Built once at start-up from ServerConfig; the set of
// exports is constant afterwards (constant after construction: no lock).
#ifndef BLOCKMETA_SERVER_UPSTREAM_EXPORT_REGISTRY_H_
#define BLOCKMETA_SERVER_UPSTREAM_EXPORT_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/status/statusor.h"
#include "blockmeta/v1/config.pb.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

struct ExportEntry {
  blockmeta::v1::ExportConfig config;
  std::unique_ptr<Upstream> upstream;
};

// Limits checked by ValidateExportConfig.
inline constexpr size_t kMaxExportNameBytes = 256;
inline constexpr uint32_t kMaxUpstreamConnections = 16;
inline constexpr uint32_t kMaxUpstreamTimeoutMs = 3600 * 1000;

// Checks one export: non-empty printable-ASCII name of at most 256 bytes,
// exactly one upstream (an nbd/nbds URI; an existing image path with format
// "", "raw" or "qcow2", bitmaps only for qcow2; a non-empty command argv),
// connections <= 16, upstream_timeout_ms <= 1 h. INVALID_ARGUMENT naming the
// export and the field. Cost: one stat(2) for image upstreams.
absl::Status ValidateExportConfig(const blockmeta::v1::ExportConfig& config);

// ValidateExportConfig for each export, plus unique names.
absl::Status ValidateExports(const blockmeta::v1::ServerConfig& config);

class ExportRegistry {
 public:
  // Validates every ExportConfig (INVALID_ARGUMENT with the export's name
  // and the field at fault) and starts connecting to each upstream in the
  // background; it does not wait for connections.
  static absl::StatusOr<std::unique_ptr<ExportRegistry>> Create(
      const blockmeta::v1::ServerConfig& config);
  // For tests: wrap ready-made upstreams (e.g. fakes).
  static std::unique_ptr<ExportRegistry> FromUpstreams(
      std::vector<
          std::pair<blockmeta::v1::ExportConfig, std::unique_ptr<Upstream>>>
          exports);

  // nullptr when unknown.
  ExportEntry* Find(const std::string& name) const;
  // Sorted by name.
  std::vector<ExportEntry*> All() const;

 private:
  absl::btree_map<std::string, std::unique_ptr<ExportEntry>> exports_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_EXPORT_REGISTRY_H_
