// client/query_commands.h — `blockmeta list`, `info EXPORT` and
// `health [SERVICE]`: what the server fronts and whether it serves.
#ifndef BLOCKMETA_CLIENT_QUERY_COMMANDS_H_
#define BLOCKMETA_CLIENT_QUERY_COMMANDS_H_

#include "client/command.h"

namespace blockmeta::client {

CommandSpec ListCommand();
CommandSpec InfoCommand();
CommandSpec HealthCommand();

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_QUERY_COMMANDS_H_
