// server/common/worker_pool_test.cc
#include "server/common/worker_pool.h"

#include <atomic>
#include <memory>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "server/common/worker_pools.h"

namespace blockmeta {
namespace {

TEST(WorkerPoolTest, RunsEveryTaskBeforeDestruction) {
  std::atomic<int> ran{0};
  {
    WorkerPool pool(3);
    for (int i = 0; i < 1000; ++i) pool.Schedule([&ran] { ran.fetch_add(1); });
  }
  EXPECT_EQ(ran.load(), 1000);
}

// Schedule accepts until the destructor begins, then refuses: a refused
// task never runs, and every accepted one does.
TEST(WorkerPoolTest, RefusesWorkOnceDestructionBegins) {
  auto pool = std::make_unique<WorkerPool>(1);
  WorkerPool* p = pool.get();
  absl::Notification started;
  std::atomic<int> accepted{0}, ran{0};
  std::atomic<bool> refused_ran{false};
  bool refused = false;
  p->Schedule([&] {
    started.Notify();
    // Accepts until ~WorkerPool sets its stop flag (the destroyer thread
    // below); each accepted task must still run.
    while (p->Schedule([&ran] { ran.fetch_add(1); })) {
      accepted.fetch_add(1);
      std::this_thread::yield();
    }
    refused = !p->Schedule([&refused_ran] { refused_ran = true; });
  });
  started.WaitForNotification();
  std::thread destroyer([&pool] { pool.reset(); });
  destroyer.join();
  EXPECT_TRUE(refused);
  EXPECT_FALSE(refused_ran.load());
  EXPECT_EQ(ran.load(), accepted.load());
}

TEST(WorkerPoolTest, BlockedTaskDoesNotStallOthers) {
  WorkerPool pool(2);
  absl::Notification release, other_ran;
  pool.Schedule([&] { release.WaitForNotification(); });
  pool.Schedule([&] { other_ran.Notify(); });
  EXPECT_TRUE(other_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  release.Notify();
}

TEST(WorkerPoolTest, ZeroThreadsMeansOne) {
  WorkerPool pool(0);
  absl::Notification done;
  pool.Schedule([&] { done.Notify(); });
  EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
}

TEST(WorkerPoolsTest, ASaturatedExportDoesNotDelayAnother) {
  WorkerPools pools({"slow", "fast"}, 1);
  EXPECT_NE(pools.For("slow"), pools.For("fast"));
  EXPECT_EQ(pools.For("slow"), pools.For("slow"));
  EXPECT_NE(pools.For("unknown"), nullptr);
  absl::Notification release, fast_ran;
  pools.For("slow")->Schedule([&] { release.WaitForNotification(); });
  pools.For("slow")->Schedule([] {});  // queued behind the blocked one
  pools.For("fast")->Schedule([&] { fast_ran.Notify(); });
  EXPECT_TRUE(fast_ran.WaitForNotificationWithTimeout(absl::Seconds(10)));
  release.Notify();
}

}  // namespace
}  // namespace blockmeta
