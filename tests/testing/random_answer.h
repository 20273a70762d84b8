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

// The property tests' three keys: an allocation context (k == 0), a
// bitmap context (k == 1) and another export's allocation context (k == 2).
inline constexpr int kPropertyKeys = 3;

// Random flags for a unit of context k of the property tests: a bitmap
// context (k == 1) is clean (0) or dirty (1), the others a base:allocation
// state (data, hole, zero, hole + zero).
template <typename Rand>
uint32_t RandomUnitFlags(int k, Rand&& rand) {
  static constexpr uint32_t kBase[] = {0, kStateHole, kStateZero,
                                       kStateHole | kStateZero};
  return k == 1 ? static_cast<uint32_t>(rand(2)) : kBase[rand(4)];
}

// A random disk for the property tests: `unit` is 1, 3, 512 or 4096 bytes,
// `units` in [min_units, min_units + extra_units), `size` cuts the last
// unit short at random, and each key's truth is runs of equal flags
// (short and long runs alike).
struct RandomDisk {
  uint64_t unit = 0;
  uint64_t units = 0;
  uint64_t size = 0;
  std::vector<uint32_t> truth[kPropertyKeys];
};

template <typename Rand>
RandomDisk MakeRandomDisk(uint64_t min_units, uint64_t extra_units,
                          Rand&& rand) {
  static constexpr uint64_t kUnits[] = {1, 3, 512, 4096};
  RandomDisk d;
  d.unit = kUnits[rand(4)];
  d.units = min_units + rand(extra_units);
  d.size = d.units * d.unit - (d.unit > 1 ? rand(d.unit) : 0);
  for (int k = 0; k < kPropertyKeys; ++k) {
    d.truth[k].resize(d.units);
    for (uint64_t u = 0; u < d.units;) {
      const uint64_t run = 1 + rand(rand(2) ? 4 : 40);
      const uint32_t f = RandomUnitFlags(k, rand);
      for (uint64_t i = u; i < std::min(d.units, u + run); ++i) {
        d.truth[k][i] = f;
      }
      u += run;
    }
  }
  return d;
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
