// client/bench_command.h — `blockmeta bench`: the load generator's flags
// and output; the load itself is bench.h's RunBenchPlan.
#ifndef BLOCKMETA_CLIENT_BENCH_COMMAND_H_
#define BLOCKMETA_CLIENT_BENCH_COMMAND_H_

#include "client/command.h"

namespace blockmeta::client {

CommandSpec BenchCommand();

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_BENCH_COMMAND_H_
