// server/common/config.h — reading the server configuration (a text proto
// of blockmeta.v1.ServerConfig, see proto/blockmeta/v1/config.proto).
//
// Parse errors name the file, line and column ("config.textproto:3:7:
// Message type ... has no field named ..."); unknown fields are errors, so
// typos never pass silently. Only syntax is checked here: the export
// semantics are checked by ValidateExports (server/upstream).
// Thread-safety: the functions are thread-safe. Cost: reads the file once.
#ifndef BLOCKMETA_SERVER_COMMON_CONFIG_H_
#define BLOCKMETA_SERVER_COMMON_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockmeta/v1/config.pb.h"

namespace blockmeta {

// Parses text-proto `text`; `source` names it in errors. INVALID_ARGUMENT
// with every error (line:column: message, one per line) on bad input.
absl::StatusOr<blockmeta::v1::ServerConfig> ParseServerConfig(
    absl::string_view text, absl::string_view source = "config");

// Reads and parses the file at `path`. NOT_FOUND / PERMISSION_DENIED when it
// cannot be read, INVALID_ARGUMENT when it does not parse.
absl::StatusOr<blockmeta::v1::ServerConfig> LoadServerConfig(
    const std::string& path);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_CONFIG_H_
