// client/cache_commands.h — `blockmeta invalidate [EXPORT]` (drop cached
// extents) and `blockmeta stats [EXPORT]` (cache and upstream counters).
#ifndef BLOCKMETA_CLIENT_CACHE_COMMANDS_H_
#define BLOCKMETA_CLIENT_CACHE_COMMANDS_H_

#include "client/command.h"

namespace blockmeta::client {

CommandSpec InvalidateCommand();
CommandSpec StatsCommand();

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_CACHE_COMMANDS_H_
