// server/common/mutex_test.cc — sync::Mutex's run-time assertions: quiet
// while the lock is held, fatal when it is not.
#include "server/common/mutex.h"

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

TEST(MutexTest, AssertHeldWhileHeld) {
  sync::Mutex mu;
  {
    sync::MutexLock lock(&mu);
    mu.AssertHeld();
    mu.AssertReaderHeld();
  }
  mu.ReaderLock();
  mu.AssertReaderHeld();
  mu.ReaderUnlock();
}

TEST(MutexDeathTest, AssertHeldWithoutTheLockDies) {
  sync::Mutex mu;
  EXPECT_DEATH(mu.AssertHeld(), "hold");
  EXPECT_DEATH(mu.AssertReaderHeld(), "hold");
}

}  // namespace
}  // namespace blockmeta
