// tests/testing/cache_property_model.h — the reference model the extent
// cache's two property tests share (server/cache/extent_cache_property_test
// and extent_cache_async_property_test): their three keys, how the disk
// changes (a write through the shim, a cleared bitmap), the byte range such
// a change invalidates, and the check that an answer equals the truth.
//
// The disk is RandomDisk's (random_answer.h): `truth[k][u]` holds key k's
// flags of unit u. Every random choice goes through `rand(n)` (uniform in
// [0, n), 0 for n == 0), in a fixed order, so a seed replays a run.
// Header-only, testonly; no state of its own.
#ifndef BLOCKMETA_TESTS_TESTING_CACHE_PROPERTY_MODEL_H_
#define BLOCKMETA_TESTS_TESTING_CACHE_PROPERTY_MODEL_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "server/cache/extent.h"
#include "server/cache/extent_cache.h"
#include "tests/testing/random_answer.h"

namespace blockmeta {
namespace testing {

// Key k of the property tests: 0 = export x's allocation, 1 = x's dirty
// bitmap, 2 = export y's allocation (kPropertyKeys of them).
inline const CacheKey& PropertyKey(int k) {
  static const CacheKey kKeys[kPropertyKeys] = {{"x", "base:allocation"},
                                                {"x", "qemu:dirty-bitmap:d"},
                                                {"y", "base:allocation"}};
  return kKeys[k];
}

// A byte range covering units [ua, ub) of `unit` bytes, sometimes starting
// up to a unit early (unaligned) and ending up to a unit late; one time in
// `to_end_one_in` it runs to the end (length 0).
template <typename Rand>
std::pair<uint64_t, uint64_t> CoveringRange(uint64_t ua, uint64_t ub,
                                            uint64_t unit,
                                            uint64_t to_end_one_in,
                                            Rand&& rand) {
  uint64_t a = ua * unit;
  if (rand(2) && a > 0) a -= 1 + rand(std::min<uint64_t>(a, unit));
  if (rand(to_end_one_in) == 0) return {a, 0};
  const uint64_t b = ub * unit + rand(unit + 1);
  return {a, b - a};
}

// What a change did to the disk: units [ua, ub) of export "x" or "y".
struct ModelChange {
  bool export_x = false;
  uint64_t ua = 0, ub = 0;
  std::string export_name() const { return export_x ? "x" : "y"; }
};

// A write through the shim: export x or y, a run of 1 to 3 units or of 1
// to `long_run` units, gets new allocation flags (mostly one value); x's
// bitmap turns dirty there. The caller then invalidates every context of
// the export over CoveringRange(ua, ub).
template <typename Rand>
ModelChange ApplyModelWrite(std::vector<uint32_t> (&truth)[kPropertyKeys],
                            uint64_t units, uint64_t long_run, Rand&& rand) {
  ModelChange c;
  c.export_x = rand(2) == 0;
  c.ua = rand(units);
  c.ub = std::min(units, c.ua + 1 + rand(rand(2) ? 3 : long_run));
  const int base = c.export_x ? 0 : 2;
  const uint32_t f = RandomUnitFlags(base, rand);
  for (uint64_t u = c.ua; u < c.ub; ++u) {
    truth[base][u] = rand(4) == 0 ? RandomUnitFlags(base, rand) : f;
    if (c.export_x) truth[1][u] = kStateDirty;
  }
  return c;
}

// The bitmap is cleared (after a backup) over 1 to 60 units: only key 1
// changes. The caller invalidates key 1 over CoveringRange(ua, ub).
template <typename Rand>
ModelChange ApplyModelBitmapClear(std::vector<uint32_t> (&truth)[kPropertyKeys],
                                  uint64_t units, Rand&& rand) {
  ModelChange c;
  c.export_x = true;
  c.ua = rand(units);
  c.ub = std::min(units, c.ua + 1 + rand(60));
  for (uint64_t u = c.ua; u < c.ub; ++u) truth[1][u] = 0;
  return c;
}

// Whether `r`, the cache's answer for [off, off + len) of a disk of `size`
// bytes in units of `unit`, is extents contiguous from `off`, inside the
// request and the export, each with the flags `truth` (one key's) has for
// every unit it touches, and next_offset where the extents end.
inline ::testing::AssertionResult MatchesTruth(
    uint64_t off, uint64_t len, uint64_t size, uint64_t unit,
    const LookupResult& r, const std::vector<uint32_t>& truth) {
  const uint64_t end = std::min(off + len, std::max(size, off));
  uint64_t pos = off;
  for (const Extent& e : r.extents) {
    if (e.offset != pos) {
      return ::testing::AssertionFailure()
             << "not contiguous: " << e << " at " << pos;
    }
    if (e.length == 0) return ::testing::AssertionFailure() << "empty " << e;
    if (e.end() > end) {
      return ::testing::AssertionFailure()
             << e << " past the request / export end " << end;
    }
    for (uint64_t u = e.offset / unit; u * unit < e.end(); ++u) {
      if (e.flags != truth[u]) {
        return ::testing::AssertionFailure()
               << "served " << e << " but unit " << u << " is " << truth[u]
               << " upstream";
      }
    }
    pos = e.end();
  }
  if (r.next_offset != pos) {
    return ::testing::AssertionFailure() << "next_offset " << r.next_offset
                                         << " where the extents end at " << pos;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace testing
}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_CACHE_PROPERTY_MODEL_H_
