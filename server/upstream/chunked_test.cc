// server/upstream/chunked_test.cc — IssueChunked against a reference model:
// random requests, piece limits and completion orders (pieces finished on
// the issuing thread, later in random order, or from other threads).
#include "server/upstream/chunked.h"

#include <algorithm>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace blockmeta {
namespace {

struct Piece {
  uint64_t offset, length, delta;
  StatusCallback done;
};

TEST(ChunkedTest, PiecesTileTheRequestAndDoneRunsOnceWithTheLowestFailure) {
  std::mt19937_64 rng(42);
  for (int round = 0; round < 2000; ++round) {
    const uint64_t offset = rng() % (1u << 20);
    const uint64_t count = rng() % 5 == 0 ? 0 : 1 + rng() % (1u << 16);
    const uint64_t max_piece = 1 + rng() % 9000;
    std::vector<Piece> pieces;
    int calls = 0;
    absl::Status got;
    IssueChunked(
        offset, count, max_piece,
        [&](uint64_t o, uint64_t n, uint64_t d, StatusCallback cb) {
          pieces.push_back(Piece{o, n, d, std::move(cb)});
        },
        [&](const absl::Status& s) {
          ++calls;
          got = s;
        });
    // Reference: consecutive pieces of max_piece, the last one shorter.
    uint64_t expect = 0;
    for (const Piece& p : pieces) {
      EXPECT_EQ(p.delta, expect);
      EXPECT_EQ(p.offset, offset + expect);
      EXPECT_GT(p.length, 0u);
      EXPECT_LE(p.length, max_piece);
      if (&p != &pieces.back()) {
        EXPECT_EQ(p.length, max_piece);
      }
      expect += p.length;
    }
    EXPECT_EQ(expect, count);
    if (count == 0) {
      EXPECT_EQ(calls, 1);
      EXPECT_TRUE(got.ok());
      continue;
    }
    // Fail a random subset, finish in random order.
    std::vector<size_t> order(pieces.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<bool> fail(pieces.size());
    size_t lowest = pieces.size();
    for (size_t i = 0; i < pieces.size(); ++i) {
      fail[i] = rng() % 4 == 0;
      if (fail[i] && lowest == pieces.size()) lowest = i;
    }
    for (size_t k = 0; k < order.size(); ++k) {
      EXPECT_EQ(calls, 0);
      const size_t i = order[k];
      std::move(pieces[i].done)(fail[i] ? absl::DataLossError(std::to_string(i))
                                        : absl::OkStatus());
    }
    EXPECT_EQ(calls, 1);
    if (lowest == pieces.size()) {
      EXPECT_TRUE(got.ok()) << got;
    } else {
      EXPECT_EQ(got, absl::DataLossError(std::to_string(lowest)));
    }
  }
}

TEST(ChunkedTest, PiecesFinishedOnOtherThreadsAndInline) {
  for (int round = 0; round < 50; ++round) {
    std::vector<std::thread> threads;
    std::atomic<int> calls{0};
    IssueChunked(
        0, 64 * 100, 64,
        [&](uint64_t, uint64_t, uint64_t d, StatusCallback cb) {
          if ((d / 64) % 3 == 0) {
            std::move(cb)(absl::OkStatus());  // inline
          } else {
            threads.emplace_back([cb = std::move(cb)]() mutable {
              std::move(cb)(absl::OkStatus());
            });
          }
        },
        [&](const absl::Status& s) {
          EXPECT_TRUE(s.ok());
          ++calls;
        });
    for (auto& t : threads) t.join();
    EXPECT_EQ(calls.load(), 1);
  }
}

}  // namespace
}  // namespace blockmeta
