// server/common/worker_pools.h — one WorkerPool per export, so blocking
// work for a slow upstream (a VDDK-backed export answering extents in
// seconds) can never hold the threads another export's calls need.
//
// Constant after construction (no lock): the export set is fixed at
// start-up. Names that are not exports (the caller validates first, so
// only in error paths) get a small shared pool. Cost: `threads` idle
// threads per export.
#ifndef BLOCKMETA_SERVER_COMMON_WORKER_POOLS_H_
#define BLOCKMETA_SERVER_COMMON_WORKER_POOLS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "server/common/worker_pool.h"

namespace blockmeta {

class WorkerPools {
 public:
  WorkerPools(const std::vector<std::string>& names, size_t threads_each);
  WorkerPools(const WorkerPools&) = delete;
  WorkerPools& operator=(const WorkerPools&) = delete;

  // The pool for `name` (never null).
  WorkerPool* For(const std::string& name) const;

 private:
  absl::flat_hash_map<std::string, std::unique_ptr<WorkerPool>> pools_;
  std::unique_ptr<WorkerPool> shared_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_WORKER_POOLS_H_
