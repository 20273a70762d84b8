// server/common/worker_pools.cc — see worker_pools.h.
#include "server/common/worker_pools.h"

namespace blockmeta {

WorkerPools::WorkerPools(const std::vector<std::string>& names,
                         size_t threads_each)
    : shared_(std::make_unique<WorkerPool>(2)) {
  for (const std::string& n : names) {
    pools_.emplace(n, std::make_unique<WorkerPool>(threads_each));
  }
}

WorkerPool* WorkerPools::For(const std::string& name) const {
  auto it = pools_.find(name);
  return it == pools_.end() ? shared_.get() : it->second.get();
}

}  // namespace blockmeta
