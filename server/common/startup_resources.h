// server/common/startup_resources.h — a check, before blockmetad starts
// gRPC and its thread pools, that the process can get the descriptors,
// threads and memory it needs. gRPC (1.51) aborts the process when it
// cannot create a thread or an epoll/eventfd descriptor (GPR_ASSERT, e.g.
// "Could not create grpc_sync_server worker-thread"), so without this a
// machine out of pids or a too-low ulimit ends in SIGABRT instead of a
// message. The check does what start-up will do, at the same scale:
//
//   - raises the soft RLIMIT_NOFILE to the hard limit (as nbdkit, systemd
//     services and most servers do), then opens `fds` descriptors at once;
//   - starts `threads` threads at once (each with the default stack), which
//     fails with no free pids (pids.max of the cgroup, kernel.pid_max /
//     threads-max) or RLIMIT_NPROC (not applied to root) or too little
//     address space for the stacks (RLIMIT_AS);
//   - maps `memory_bytes` of address space (RLIMIT_AS, overcommit) and holds
//     it while the threads start, so heap and stacks add up as they will.
//
// Everything is released before it returns. It can pass and start-up still
// fail if another process takes the last pid in between; then the error
// handling in server/main.cc (std::system_error, std::bad_alloc) applies
// wherever our own code creates the thread.
//
// Thread-safe; takes a few milliseconds.
#ifndef BLOCKMETA_SERVER_COMMON_STARTUP_RESOURCES_H_
#define BLOCKMETA_SERVER_COMMON_STARTUP_RESOURCES_H_

#include <cstddef>

#include "absl/status/status.h"

namespace blockmeta {

struct StartupNeeds {
  int fds = 64;
  int threads = 48;
  size_t memory_bytes = size_t{256} << 20;
};

// OK, or RESOURCE_EXHAUSTED naming what ran out, the limit in force and
// what to raise.
absl::Status CheckStartupResources(const StartupNeeds& needs);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_STARTUP_RESOURCES_H_
