// bench/cache_benchmark.cc — figures for the extent cache (server/cache):
// ns per Lookup and per fill (Get on a miss with an instant fetcher) at 1k,
// 100k and 1M cached extents with 1-8 threads, and bytes per cached extent
// (the cache's own memory_bytes gauge and glibc mallinfo2() deltas). Not a
// test: run with --config=opt and copy the figures to docs/benchmarks.md.
//
//   bazel run --config=opt //bench:cache_benchmark
#include <malloc.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include "absl/time/clock.h"
#include "benchmark/benchmark.h"
#include "server/cache/extent_cache.h"

namespace blockmeta {
namespace {

constexpr uint64_t kExtent = 4096;
const CacheKey kKey{"bench", "base:allocation"};

uint32_t FlagsOf(uint64_t offset) {
  return static_cast<uint32_t>((offset / kExtent) % 2);  // never merge
}

// Answers the window with alternating 4 KiB extents, up to 64Ki of them.
absl::StatusOr<ExtentList> AlternatingFetch(uint64_t off, uint64_t len,
                                            absl::Time) {
  ExtentList out;
  const uint64_t end = off + std::min<uint64_t>(len, 65536 * kExtent);
  for (uint64_t pos = off; pos < end; pos += kExtent) {
    out.push_back(Extent{pos, std::min(kExtent, end - pos), FlagsOf(pos)});
  }
  return out;
}

ExtentCache::Options BenchOptions() {
  ExtentCache::Options o;
  o.memory_limit_bytes = 4ull << 30;  // no eviction while measuring
  return o;
}

// Fills `cache` with n extents by whole-window fetches (sequential order).
void FillSequential(ExtentCache& cache, uint64_t n) {
  const uint64_t size = n * kExtent;
  uint64_t pos = 0;
  while (pos < size) {
    auto r = cache.Get(kKey, size, pos, size - pos, 0, AlternatingFetch,
                       absl::InfiniteFuture());
    if (!r.ok()) std::abort();
    pos = r->next_offset;
  }
}

// One shared cache per size, built on first use and kept for every
// benchmark and thread count.
ExtentCache& CacheWith(uint64_t n) {
  static std::mutex mu;
  static auto* caches = new std::map<uint64_t, std::unique_ptr<ExtentCache>>;
  std::lock_guard<std::mutex> l(mu);
  auto& slot = (*caches)[n];
  if (slot == nullptr) {
    slot = std::make_unique<ExtentCache>(BenchOptions());
    FillSequential(*slot, n);
  }
  return *slot;
}

// xorshift64*: cheap enough not to dominate a 100 ns measurement.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
};

// Lookup of one 4 KiB block at a random extent: one btree descent.
void BM_Lookup(benchmark::State& state) {
  const uint64_t n = state.range(0);
  ExtentCache& cache = CacheWith(n);
  Rng rng{0x9e3779b97f4a7c15ull + state.thread_index()};
  uint64_t found = 0;
  for (auto _ : state) {
    const uint64_t off = (rng.Next() % n) * kExtent + 512;
    LookupResult r = cache.Lookup(kKey, off, 8192, 0);
    found += r.extents.size();
    benchmark::DoNotOptimize(r);
  }
  if (found == 0) state.SkipWithError("nothing found");
  state.SetItemsProcessed(state.iterations());
  if (state.thread_index() == 0) {
    const CacheCounters c = cache.Counters();
    state.counters["extents"] = c.entries;
    state.counters["bytes_per_extent"] = double(c.memory_bytes) / c.entries;
  }
}

// Fill: forget one extent, then Get it (a miss; the fetcher answers at
// once with that extent). Measures Invalidate + Get + insert + merge check.
void BM_Fill(benchmark::State& state) {
  const uint64_t n = state.range(0);
  ExtentCache& cache = CacheWith(n);
  const uint64_t size = n * kExtent;
  Rng rng{0x1234567ull + state.thread_index()};
  auto one = [](uint64_t off, uint64_t,
                absl::Time) -> absl::StatusOr<ExtentList> {
    return ExtentList{{off, kExtent, FlagsOf(off)}};
  };
  for (auto _ : state) {
    const uint64_t off = (rng.Next() % n) * kExtent;
    cache.Invalidate(kKey, off, kExtent);
    auto r =
        cache.Get(kKey, size, off, kExtent, 0, one, absl::InfiniteFuture());
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(state.iterations());
}

// Bytes per cached extent, for a sequential fill (few big fetches) and a
// random-order fill (one Get per extent): the cache's memory_bytes gauge
// and the real heap growth measured by mallinfo2().
void BM_MemoryPerExtent(benchmark::State& state) {
  const uint64_t n = state.range(0);
  const bool random_order = state.range(1) != 0;
  double gauge = 0, heap = 0;
  for (auto _ : state) {
    const size_t before = mallinfo2().uordblks;
    auto cache = std::make_unique<ExtentCache>(BenchOptions());
    if (random_order) {
      std::vector<uint64_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
      auto one = [](uint64_t off, uint64_t,
                    absl::Time) -> absl::StatusOr<ExtentList> {
        return ExtentList{{off, kExtent, FlagsOf(off)}};
      };
      for (uint64_t i : order) {
        auto r = cache->Get(kKey, n * kExtent, i * kExtent, kExtent, 0, one,
                            absl::InfiniteFuture());
        if (!r.ok()) std::abort();
      }
      // Do not charge the shuffled order vector to the cache.
      std::vector<uint64_t>().swap(order);
    } else {
      FillSequential(*cache, n);
    }
    const size_t after = mallinfo2().uordblks;
    const CacheCounters c = cache->Counters();
    if (c.entries != n) state.SkipWithError("unexpected extent count");
    gauge = double(c.memory_bytes) / double(c.entries);
    heap = (double(after) - double(before)) / double(c.entries);
  }
  state.counters["extents"] = double(n);
  state.counters["gauge_bytes_per_extent"] = gauge;
  state.counters["malloc_bytes_per_extent"] = heap;
}

BENCHMARK(BM_Lookup)
    ->Arg(1000)
    ->Arg(100000)
    ->Arg(1000000)
    ->ThreadRange(1, 8)
    ->UseRealTime();
BENCHMARK(BM_Fill)
    ->Arg(1000)
    ->Arg(100000)
    ->Arg(1000000)
    ->ThreadRange(1, 8)
    ->UseRealTime();
BENCHMARK(BM_MemoryPerExtent)
    ->Args({1000, 0})
    ->Args({100000, 0})
    ->Args({1000000, 0})
    ->Args({1000, 1})
    ->Args({100000, 1})
    ->Args({1000000, 1})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace blockmeta

// Debian ships no benchmark_main.pc, so //third_party:benchmark_main does
// not resolve; the main is defined here.
BENCHMARK_MAIN();
