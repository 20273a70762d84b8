// server/service/csi_ranges_test.cc
#include "server/service/csi_ranges.h"

#include <vector>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

std::vector<CsiRange> All(CsiRangeBuilder& b) {
  std::deque<CsiRange> d = b.Take(0, /*final=*/true);
  return std::vector<CsiRange>(d.begin(), d.end());
}

TEST(CsiRangesTest, AllocatedSkipsZeroesAndMergesTouchingData) {
  CsiRangeBuilder b(CsiRangeBuilder::Select::kAllocated, 0, 1 << 20);
  b.Add({0, 4096, 0});                            // data
  b.Add({4096, 4096, kStateZero});                // allocated zeroes: skip
  b.Add({8192, 4096, kStateHole});                // hole, not zero: copy!
  b.Add({12288, 4096, 0});                        // data, touches previous
  b.Add({16384, 8192, kStateHole | kStateZero});  // sparse hole: skip
  EXPECT_EQ(All(b), (std::vector<CsiRange>{{0, 4096}, {8192, 8192}}));
}

TEST(CsiRangesTest, DirtySelectsOnlyDirty) {
  CsiRangeBuilder b(CsiRangeBuilder::Select::kDirty, 0, 1 << 20);
  b.Add({0, 65536, 0});
  b.Add({65536, 65536, kStateDirty});
  b.Add({131072, 65536, 0});
  EXPECT_EQ(All(b), (std::vector<CsiRange>{{65536, 65536}}));
}

TEST(CsiRangesTest, FixedLengthRoundsOutwardAndNeverRepeatsABlock) {
  CsiRangeBuilder b(CsiRangeBuilder::Select::kAllocated, 4096, 5 * 4096 + 100);
  b.Add({100, 200, 0});   // inside block 0
  b.Add({300, 4000, 0});  // blocks 0 and 1
  b.Add({4300, 8000, kStateZero | kStateHole});
  b.Add({12300, 8000, 0});  // blocks 3, 4
  b.Add({20300, 280, 0});   // block 4 (seen) and the short last block
  std::vector<CsiRange> got = All(b);
  EXPECT_EQ(got, (std::vector<CsiRange>{{0, 4096},
                                        {4096, 4096},
                                        {12288, 4096},
                                        {16384, 4096},
                                        {20480, 100}}));
}

TEST(CsiRangesTest, TakeHoldsBackTheOpenRangeUntilFinal) {
  CsiRangeBuilder b(CsiRangeBuilder::Select::kAllocated, 0, 1 << 20);
  b.Add({0, 10, 0});
  b.Add({20, 10, 0});
  b.Add({30, 10, 0});  // merges with [20,30)
  EXPECT_EQ(b.Ready(false), 1u);
  std::deque<CsiRange> first = b.Take(10, false);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0], (CsiRange{0, 10}));
  b.Add({40, 10, 0});  // still merging
  std::deque<CsiRange> last = b.Take(10, true);
  ASSERT_EQ(last.size(), 1u);
  EXPECT_EQ(last[0], (CsiRange{20, 30}));
}

TEST(CsiRangesTest, TakeRespectsMax) {
  CsiRangeBuilder b(CsiRangeBuilder::Select::kAllocated, 0, 1 << 20);
  for (uint64_t i = 0; i < 10; ++i) b.Add({i * 20, 10, 0});
  EXPECT_EQ(b.Take(3, false).size(), 3u);
  EXPECT_EQ(b.Take(100, true).size(), 7u);
}

}  // namespace
}  // namespace blockmeta
