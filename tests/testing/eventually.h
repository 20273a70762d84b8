// tests/testing/eventually.h — test only: wait for a condition that can
// only be observed from outside (a child process exiting, a server's
// answers, a file appearing), where no notification exists to wait on.
//
//   ASSERT_TRUE(Eventually([&] { return !server->Running(); }));
//
// It polls `condition` every `poll` until it holds or `timeout` passes and
// returns whether it held; the condition is evaluated once more at the
// deadline, so a slow machine never turns a true condition into a false
// failure. Prefer an absl::Notification / CondVar when the code under test
// can signal. Thread-safety: as safe as `condition`.
#ifndef BLOCKMETA_TESTS_TESTING_EVENTUALLY_H_
#define BLOCKMETA_TESTS_TESTING_EVENTUALLY_H_

#include "absl/functional/function_ref.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace blockmeta::testing {

inline bool Eventually(absl::FunctionRef<bool()> condition,
                       absl::Duration timeout = absl::Seconds(20),
                       absl::Duration poll = absl::Milliseconds(10)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (condition()) return true;
    absl::SleepFor(poll);
  }
  return condition();
}

}  // namespace blockmeta::testing

#endif  // BLOCKMETA_TESTS_TESTING_EVENTUALLY_H_
