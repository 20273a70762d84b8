// server/service/context_merge_test.cc — the merge against a per-byte
// model: random extent lists for 1-3 contexts whose boundaries (almost)
// never line up, fed in random batches in the order a stream feeds them
// (always the lagging input), drained with random limits. Checks the
// output is contiguous, split only where some input changes (coalesced),
// carries each input's flags byte for byte, and holds at most one batch
// per input.
#include "server/service/context_merge.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

// Extents tiling [start, end) with random odd lengths and random flags
// (few flag values, so equal neighbours happen and coalescing matters).
ExtentList RandomList(std::mt19937_64* rng, uint64_t start, uint64_t end) {
  ExtentList out;
  for (uint64_t off = start; off < end;) {
    uint64_t len = std::min<uint64_t>(end - off, 1 + (*rng)() % 97);
    out.push_back({off, len, static_cast<uint32_t>((*rng)() % 3)});
    off += len;
  }
  return out;
}

std::vector<uint32_t> PerByte(const ExtentList& l, uint64_t start,
                              uint64_t end) {
  std::vector<uint32_t> m(end - start, ~0u);
  for (const Extent& e : l) {
    for (uint64_t b = e.offset; b < e.end(); ++b) m[b - start] = e.flags;
  }
  return m;
}

void RunOnce(std::mt19937_64* rng, size_t n, bool coalesce) {
  const uint64_t start = (*rng)() % 1000;
  const uint64_t end = start + 1 + (*rng)() % 3000;
  std::vector<ExtentList> in(n);
  std::vector<std::vector<uint32_t>> model(n);
  for (size_t i = 0; i < n; ++i) {
    in[i] = RandomList(rng, start, end);
    model[i] = PerByte(in[i], start, end);
  }
  ContextMerge merge(n, start, coalesce);
  std::vector<size_t> next(n, 0);
  std::vector<MergedExtent> out;
  const size_t batch = 1 + (*rng)() % 8;
  while (merge.known_end() < end) {
    size_t i = merge.Lagging();
    ASSERT_LT(next[i], in[i].size());
    for (size_t k = 0; k < batch && next[i] < in[i].size(); ++k) {
      merge.Add(i, in[i][next[i]++]);
    }
    // One batch per input, plus the output not yet taken (bounded by what
    // those batches can produce).
    ASSERT_LE(merge.held(), n * batch + merge.ready() + 1);
    merge.Take(&out, (*rng)() % 4, /*final=*/false);
    // What is out never passes what every input covers.
    if (!out.empty()) ASSERT_LE(out.back().end(), merge.known_end());
  }
  merge.Take(&out, 0, /*final=*/true);
  ASSERT_FALSE(out.empty());
  uint64_t pos = start;
  for (size_t k = 0; k < out.size(); ++k) {
    const MergedExtent& m = out[k];
    ASSERT_EQ(m.offset, pos);
    ASSERT_GT(m.length, 0u);
    ASSERT_EQ(m.flags.size(), n);
    for (uint64_t b = m.offset; b < m.end(); ++b) {
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(m.flags[i], model[i][b - start]) << "byte " << b;
      }
    }
    if (k > 0) {
      bool some_input_changes = false;
      for (size_t i = 0; i < n; ++i) {
        some_input_changes =
            some_input_changes ||
            model[i][m.offset - start] != model[i][m.offset - 1 - start];
      }
      if (coalesce) {
        // A boundary only where a context's flags change...
        ASSERT_TRUE(some_input_changes) << "needless split at " << m.offset;
      } else {
        // ...or, uncoalesced, where some input had a boundary.
        bool input_boundary = false;
        for (size_t i = 0; i < n; ++i) {
          for (const Extent& e : in[i]) input_boundary |= e.offset == m.offset;
        }
        ASSERT_TRUE(input_boundary) << "split at no boundary " << m.offset;
      }
    }
    pos = m.end();
  }
  ASSERT_EQ(pos, end);
  if (!coalesce) {
    // Split at the union of the boundaries: every input boundary is one.
    for (size_t i = 0; i < n; ++i) {
      for (const Extent& e : in[i]) {
        bool found = false;
        for (const MergedExtent& m : out) found |= m.offset == e.offset;
        ASSERT_TRUE(found) << "input " << i << " boundary " << e.offset;
      }
    }
  }
}

TEST(ContextMergeTest, MatchesAPerByteModelForOneToThreeContexts) {
  std::mt19937_64 rng(424242);
  for (int round = 0; round < 600; ++round) {
    size_t n = 1 + round % 3;
    RunOnce(&rng, n, /*coalesce=*/round % 2 == 0);
    if (::testing::Test::HasFatalFailure()) {
      FAIL() << "round " << round;
    }
  }
}

TEST(ContextMergeTest, SplitsAtTheUnionOfBoundaries) {
  ContextMerge m(2, 0, /*coalesce=*/true);
  m.Add(0, {0, 100, 0});
  m.Add(0, {100, 100, 3});
  m.Add(1, {0, 50, 1});
  m.Add(1, {50, 150, 0});
  std::vector<MergedExtent> out;
  m.Take(&out, 0, true);
  std::vector<MergedExtent> want = {
      {0, 50, {0, 1}}, {50, 50, {0, 0}}, {100, 100, {3, 0}}};
  EXPECT_EQ(out, want);
}

TEST(ContextMergeTest, HoldsBackWhatALaggingInputHasNotCovered) {
  ContextMerge m(2, 0, /*coalesce=*/false);
  m.Add(0, {0, 1000, 0});
  EXPECT_EQ(m.known_end(), 0u);
  EXPECT_EQ(m.Lagging(), 1u);
  m.Add(1, {0, 10, 1});
  std::vector<MergedExtent> out;
  m.Take(&out, 0, false);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], (MergedExtent{0, 10, {0, 1}}));
  EXPECT_EQ(m.Lagging(), 1u);
}

}  // namespace
}  // namespace blockmeta
