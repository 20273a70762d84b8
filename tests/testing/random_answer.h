// tests/testing/random_answer.h — the randomized upstream of the extent
// cache's property tests: what an NBD server may answer to one
// block-status call over a disk described unit by unit.
//
// `truth[u]` is the context's flags of unit u (`unit` bytes each) of a disk
// of `size` bytes (the last unit may be cut short). The answer to
// [off, off + len) starts at `off` and covers a random length: exactly
// `len`, shorter, longer than asked, or past the export end, where its
// flags are garbage (0x80 set) that the cache must clip. `limit` (when
// not 0) caps that length, as a window-limited server does. Runs of equal
// flags are split at random points, as servers split at their own
// boundaries. `rand(n)` returns a uniform value in [0, n) (0 for n == 0);
// every random choice goes through it, so a seed replays the answer.
#ifndef BLOCKMETA_TESTS_TESTING_RANDOM_ANSWER_H_
#define BLOCKMETA_TESTS_TESTING_RANDOM_ANSWER_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "server/cache/extent.h"

namespace blockmeta {
namespace testing {

// Random flags for a unit of context k of the property tests: a bitmap
// context (k == 1) is clean (0) or dirty (1), the others a base:allocation
// state (data, hole, zero, hole + zero).
template <typename Rand>
uint32_t RandomUnitFlags(int k, Rand&& rand) {
  static constexpr uint32_t kBase[] = {0, kStateHole, kStateZero,
                                       kStateHole | kStateZero};
  return k == 1 ? static_cast<uint32_t>(rand(2)) : kBase[rand(4)];
}

template <typename Rand>
ExtentList RandomUpstreamAnswer(uint64_t off, uint64_t len,
                                const std::vector<uint32_t>& truth,
                                uint64_t unit, uint64_t size, uint64_t limit,
                                Rand&& rand) {
  uint64_t answer;
  switch (rand(4)) {
    case 0:
      answer = len;
      break;
    case 1:
      answer = 1 + rand(len);
      break;
    case 2:
      answer = len + 1 + rand(unit * 3);
      break;
    default:
      answer = size - off + 1 + rand(unit * 2);
      break;
  }
  if (limit != 0) answer = std::min(answer, limit);
  const uint64_t units = truth.size();
  const uint64_t end = off + answer;
  ExtentList out;
  for (uint64_t pos = off; pos < end;) {
    uint64_t e;
    uint32_t flags;
    if (pos >= size) {  // garbage past the export end: must be clipped
      e = end;
      flags = 0x80 | static_cast<uint32_t>(rand(4));
    } else {
      flags = truth[pos / unit];
      uint64_t u = pos / unit + 1;
      while (u < units && truth[u] == flags) ++u;
      e = std::min({u * unit, size, end});
      if (e - pos > 1 && rand(4) == 0) e = pos + 1 + rand(e - pos - 1);
    }
    out.push_back(Extent{pos, e - pos, flags});
    pos = e;
  }
  return out;
}

}  // namespace testing
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_RANDOM_ANSWER_H_
