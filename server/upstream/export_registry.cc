// server/upstream/export_registry.cc — see export_registry.h.
#include "server/upstream/export_registry.h"

#include <sys/stat.h>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/upstream/nbd_upstream.h"

namespace blockmeta {
namespace {

absl::Status Bad(const blockmeta::v1::ExportConfig& config,
                 absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("export \"", config.name(), "\": ", field, ": ", why));
}

}  // namespace

absl::Status ValidateExportConfig(const blockmeta::v1::ExportConfig& config) {
  const std::string& name = config.name();
  if (name.empty()) return Bad(config, "name", "required");
  if (name.size() > kMaxExportNameBytes) {
    return Bad(config, "name",
               absl::StrCat("longer than ", kMaxExportNameBytes, " bytes"));
  }
  for (char c : name) {
    if (c < 0x20 || c > 0x7e) {
      return Bad(config, "name", "must be printable ASCII");
    }
  }
  switch (config.upstream_case()) {
    case blockmeta::v1::ExportConfig::kNbdUri: {
      const std::string& uri = config.nbd_uri();
      if (!absl::StartsWith(uri, "nbd://") &&
          !absl::StartsWith(uri, "nbds://") &&
          !absl::StartsWith(uri, "nbd+unix://") &&
          !absl::StartsWith(uri, "nbds+unix://") &&
          !absl::StartsWith(uri, "nbd+vsock://") &&
          !absl::StartsWith(uri, "nbds+vsock://")) {
        return Bad(config, "nbd_uri",
                   "must be an nbd://, nbds://, nbd+unix://, nbds+unix://, "
                   "nbd+vsock:// or nbds+vsock:// URI");
      }
      break;
    }
    case blockmeta::v1::ExportConfig::kImage: {
      const auto& image = config.image();
      if (image.path().empty()) return Bad(config, "image.path", "required");
      struct stat st;
      if (stat(image.path().c_str(), &st) != 0) {
        return Bad(config, "image.path",
                   absl::StrCat("cannot access ", image.path()));
      }
      if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        return Bad(
            config, "image.path",
            absl::StrCat(image.path(), " is not a file or block device"));
      }
      if (!image.format().empty() && image.format() != "raw" &&
          image.format() != "qcow2") {
        return Bad(config, "image.format",
                   absl::StrCat("\"", image.format(),
                                "\" is not \"raw\" or \"qcow2\""));
      }
      if (image.bitmaps_size() > 0 && ImageFormat(image) != "qcow2") {
        return Bad(config, "image.bitmaps",
                   "persistent dirty bitmaps need a qcow2 image");
      }
      for (const std::string& b : image.bitmaps()) {
        if (b.empty() || b.size() > 1023) {
          return Bad(config, "image.bitmaps", "bad bitmap name");
        }
      }
      break;
    }
    case blockmeta::v1::ExportConfig::kCommand:
      if (config.command().argv_size() == 0 ||
          config.command().argv(0).empty()) {
        return Bad(config, "command.argv", "required");
      }
      break;
    default:
      return Bad(config, "upstream",
                 "exactly one of nbd_uri, image, command is required");
  }
  if (config.connections() > kMaxUpstreamConnections) {
    return Bad(config, "connections",
               absl::StrCat("at most ", kMaxUpstreamConnections));
  }
  if (config.upstream_timeout_ms() > kMaxUpstreamTimeoutMs) {
    return Bad(config, "upstream_timeout_ms",
               absl::StrCat("at most ", kMaxUpstreamTimeoutMs));
  }
  return absl::OkStatus();
}

absl::Status ValidateExports(const blockmeta::v1::ServerConfig& config) {
  absl::flat_hash_set<std::string> names;
  for (const auto& e : config.exports()) {
    absl::Status s = ValidateExportConfig(e);
    if (!s.ok()) return s;
    if (!names.insert(e.name()).second) {
      return Bad(e, "name", "duplicate export name");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ExportRegistry>> ExportRegistry::Create(
    const blockmeta::v1::ServerConfig& config) {
  absl::Status s = ValidateExports(config);
  if (!s.ok()) return s;
  auto registry = std::make_unique<ExportRegistry>();
  for (const auto& e : config.exports()) {
    absl::StatusOr<std::unique_ptr<Upstream>> up = CreateUpstream(e);
    if (!up.ok()) return up.status();
    auto entry = std::make_unique<ExportEntry>();
    entry->config = e;
    entry->upstream = std::move(*up);
    registry->exports_.emplace(e.name(), std::move(entry));
  }
  return registry;
}

std::unique_ptr<ExportRegistry> ExportRegistry::FromUpstreams(
    std::vector<
        std::pair<blockmeta::v1::ExportConfig, std::unique_ptr<Upstream>>>
        exports) {
  auto registry = std::make_unique<ExportRegistry>();
  for (auto& [config, upstream] : exports) {
    auto entry = std::make_unique<ExportEntry>();
    entry->config = config;
    entry->upstream = std::move(upstream);
    registry->exports_[config.name()] = std::move(entry);
  }
  return registry;
}

ExportEntry* ExportRegistry::Find(const std::string& name) const {
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second.get();
}

std::vector<ExportEntry*> ExportRegistry::All() const {
  std::vector<ExportEntry*> out;
  out.reserve(exports_.size());
  for (const auto& [name, entry] : exports_) out.push_back(entry.get());
  return out;
}

}  // namespace blockmeta
