// client/export_commands.h — `blockmeta export add|remove|list`: turning the
// command's flags into a blockmeta.v1.ExportConfig, and printing the Admin
// answers, and the command's table entry and runner (registered in cli.cc).
//
//   blockmeta --server=unix:/run/blockmeta/grpc.sock export add job7
//       --uri=nbd+unix:///?socket=/run/job7.sock      (one line)
//   blockmeta ... export add job8 --image=/vm/disk.qcow2 --bitmap=b1,b2
//   blockmeta ... export add demo --command="nbdkit memory 1G"
//   blockmeta ... export remove job7
//   blockmeta ... export list
#ifndef BLOCKMETA_CLIENT_EXPORT_COMMANDS_H_
#define BLOCKMETA_CLIENT_EXPORT_COMMANDS_H_

#include <map>
#include <optional>
#include <ostream>
#include <string>

#include "blockmeta/v1/admin.pb.h"
#include "client/command.h"

namespace blockmeta::client {

// Fills *out from the flags of `export add NAME`: exactly one of --uri,
// --image (with --format, --bitmap=B[,B...], --image-read-only) or
// --command (split at spaces); --description, --read-only,
// --connections=N, --upstream-timeout-ms=N, --cache-ttl-seconds=N.
// Returns a usage error message, or nullopt.
std::optional<std::string> ExportConfigFromFlags(
    const std::string& name, const std::map<std::string, std::string>& flags,
    blockmeta::v1::ExportConfig* out);

// One line per export: NAME STATE ORIGIN generation=N [last error].
void PrintAdminExport(std::ostream& o, const blockmeta::v1::AdminExport& e);

// `export add|remove|list [NAME]`.
CommandSpec ExportCommand();

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_EXPORT_COMMANDS_H_
