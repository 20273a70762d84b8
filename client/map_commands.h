// client/map_commands.h — `blockmeta map EXPORT` (extents of one or more
// contexts) and `blockmeta changed EXPORT --bitmap=NAME` (the dirty blocks,
// with zero information), streamed through MapExtents with a progress bar.
#ifndef BLOCKMETA_CLIENT_MAP_COMMANDS_H_
#define BLOCKMETA_CLIENT_MAP_COMMANDS_H_

#include "client/command.h"

namespace blockmeta::client {

CommandSpec MapCommand();
CommandSpec ChangedCommand();

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_MAP_COMMANDS_H_
