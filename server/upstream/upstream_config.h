// server/upstream/upstream_config.h — defaults of the ExportConfig fields
// every upstream reads, in one place that links nothing but the config
// proto (the shim and the services read them without linking libnbd).
#ifndef BLOCKMETA_SERVER_UPSTREAM_UPSTREAM_CONFIG_H_
#define BLOCKMETA_SERVER_UPSTREAM_UPSTREAM_CONFIG_H_

#include <cstdint>

#include "absl/time/time.h"
#include "blockmeta/v1/config.pb.h"

namespace blockmeta {

// Defaults for ExportConfig fields left 0.
inline constexpr uint32_t kDefaultUpstreamConnections = 2;
inline constexpr uint32_t kDefaultUpstreamTimeoutMs = 30000;

// The export's upstream_timeout_ms, kDefaultUpstreamTimeoutMs when unset.
inline absl::Duration UpstreamTimeout(const blockmeta::v1::ExportConfig& c) {
  return absl::Milliseconds(c.upstream_timeout_ms() != 0
                                ? c.upstream_timeout_ms()
                                : kDefaultUpstreamTimeoutMs);
}

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_UPSTREAM_CONFIG_H_
