// server/common/pending.h — Pending<T>: one result handed from a completion
// (any thread) to a caller that waits for it with a deadline.
//
// The waiter and the completion share it (std::shared_ptr), so a completion
// that runs after the waiter gave up at its deadline still has somewhere to
// put its result. Built on sync::Mutex, so ThreadSanitizer sees the hand-off
// (absl::Notification lives in Debian's uninstrumented Abseil: TSan cannot
// see it synchronize and reports the result as a race).
// Thread-safety: Set() and Wait() may run on different threads; Set() once.
#ifndef BLOCKMETA_SERVER_COMMON_PENDING_H_
#define BLOCKMETA_SERVER_COMMON_PENDING_H_

#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/common/mutex.h"

namespace blockmeta {

template <typename T>
class Pending {
 public:
  void Set(T v) {
    sync::MutexLock lock(&mu_);
    result_ = std::move(v);
    cv_.SignalAll();
  }
  // The result; nullopt when `deadline` passed first.
  std::optional<T> Wait(absl::Time deadline) {
    sync::MutexLock lock(&mu_);
    while (!result_.has_value()) {
      if (mu_.WaitWithDeadline(&cv_, deadline)) break;
    }
    return std::move(result_);
  }

 private:
  sync::Mutex mu_;
  absl::CondVar cv_;
  std::optional<T> result_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_COMMON_PENDING_H_
