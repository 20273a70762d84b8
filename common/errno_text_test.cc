// common/errno_text_test.cc — ErrnoText gives strerror's text, also
// for unknown values, and each thread its own from many threads at once.
#include "common/errno_text.h"

#include <cerrno>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

// glibc's texts (the platform blockmeta builds on).
TEST(ErrnoTextTest, SameTextAsStrerror) {
  EXPECT_EQ(ErrnoText(0), "Success");
  EXPECT_EQ(ErrnoText(ENOENT), "No such file or directory");
  EXPECT_EQ(ErrnoText(EACCES), "Permission denied");
  EXPECT_EQ(ErrnoText(4242), "Unknown error 4242");
  EXPECT_EQ(ErrnoText(-1), "Unknown error -1");
}

TEST(ErrnoTextTest, ThreadsGetTheirOwnText) {
  std::vector<std::thread> threads;
  threads.reserve(8);
  std::vector<int> wrong(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([t, &wrong] {
      const int err = t % 2 ? ENOENT : 5000 + t;  // unknown ones use a buffer
      const std::string want =
          t % 2 ? "No such file or directory"
                : "Unknown error " + std::to_string(5000 + t);
      for (int i = 0; i < 2000; ++i) {
        if (ErrnoText(err) != want) ++wrong[t];
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(wrong[t], 0) << t;
}

}  // namespace
}  // namespace blockmeta
