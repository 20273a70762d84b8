// server/cache/granule_property_test.cc — GranuleBound against a reference
// model, alone and as ExtentCache uses it.
//
// The model is an upstream context with a hidden granularity G (random,
// also not a power of two; 512 B to 64 MiB in the unit tests) whose state
// changes per granule: a dirty bitmap (a write dirties every granule it
// touches) or an allocation-like map (a write sets any new flags on every
// granule it touches). Answers are made as upstreams make them: qemu-nbd
// style (from any offset, clipped to the request), nbdkit style (running
// past the request to a granule end), cut short, and with runs of equal
// flags split at arbitrary 512-byte offsets. The export size is not a
// multiple of G (a partial last granule).
//
// Properties: the bound is 0 or a multiple of G; a write rounded out to it
// covers every granule the write touched; and through ExtentCache (writes
// reported with InvalidateExportRange over exactly the written bytes, no
// floor), every cached extent equals the model after every step.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/cache/granule.h"

namespace blockmeta {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kMiB = 1 << 20;

TEST(GranuleBound, UnknownUntilFlagsChangeInsideAnAnswer) {
  GranuleBound g;
  EXPECT_EQ(g.RoundOut(7 * kMiB + 512, 7 * kMiB + 1024),
            std::make_pair(uint64_t{0}, GranuleBound::kEverything));
  // A uniform answer (a clean 64 MiB-granule bitmap) and splits of equal
  // flags teach nothing.
  g.Observe(ExtentList{{0, 64 * kMiB, 0}});
  g.Observe(ExtentList{{0, 512, 1}, {512, 4096, 1}, {4608, 512, 1}});
  EXPECT_EQ(g.bound(), 0u);
  // The case: a 4 MiB granule dirty at [4 MiB, 8 MiB).
  g.Observe(ExtentList{{0, 4 * kMiB, 0}, {4 * kMiB, 4 * kMiB, 1}});
  EXPECT_EQ(g.bound(), 4 * kMiB);
  g.Observe(ExtentList{{6 * kMiB, 2 * kMiB, 1}, {8 * kMiB, 1 * kMiB, 0}});
  EXPECT_EQ(g.bound(), 4 * kMiB);
  EXPECT_EQ(g.RoundOut(7 * kMiB + 512, 7 * kMiB + 1024),
            std::make_pair(4 * kMiB, 8 * kMiB));
  g.Reset();
  EXPECT_EQ(g.bound(), 0u);
}

TEST(GranuleBound, NonPowerOfTwoAndSaturation) {
  GranuleBound g;
  // One boundary at 192 MiB (a 64 MiB granule seen once): a multiple of G.
  g.Observe(ExtentList{{100 * kMiB, 92 * kMiB, 1}, {192 * kMiB, kMiB, 0}});
  EXPECT_EQ(g.bound(), 192 * kMiB);
  EXPECT_EQ(g.RoundOut(200 * kMiB, 200 * kMiB + 1),
            std::make_pair(192 * kMiB, 384 * kMiB));
  EXPECT_EQ(g.RoundOut(0, GranuleBound::kEverything - 5).second,
            GranuleBound::kEverything);
  // Boundaries at or past `below` (a poisoned tail) are not learned.
  GranuleBound h;
  h.Observe(ExtentList{{0, 1536, 0}, {1536, 512, 1}}, /*below=*/1536);
  EXPECT_EQ(h.bound(), 0u);
  h.Observe(ExtentList{{0, 1536, 0}, {1536, 512, 1}}, /*below=*/1537);
  EXPECT_EQ(h.bound(), 1536u);
}

// The hidden upstream context.
class Model {
 public:
  Model(std::mt19937_64* rng, uint64_t granule, uint64_t size, bool bitmap)
      : rng_(rng), g_(granule), size_(size), bitmap_(bitmap) {
    flags_.resize((size + g_ - 1) / g_);
    for (uint32_t& f : flags_) f = bitmap_ ? Rand(3) == 0 : Rand(4);
  }
  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : (*rng_)() % n; }
  uint64_t size() const { return size_; }
  uint32_t FlagsAt(uint64_t off) const { return flags_[off / g_]; }

  // A write of [a, b): every granule it touches may change.
  void Write(uint64_t a, uint64_t b) {
    for (uint64_t i = a / g_; i * g_ < b; ++i) {
      flags_[i] = bitmap_ ? 1 : Rand(4);
    }
  }
  void ClearAll() {
    for (uint32_t& f : flags_) f = 0;
  }

  // An answer for [off, off + len), as some upstream would give it.
  ExtentList Answer(uint64_t off, uint64_t len) {
    uint64_t end = std::min(size_, off + len);
    switch (Rand(4)) {
      case 0:  // nbdkit style: on to a granule end (or further)
        end = std::min(size_, (end / g_ + 1 + Rand(3)) * g_);
        break;
      case 1:  // short
        end = off + std::max<uint64_t>(1, Rand(end - off + 1));
        break;
      default:  // qemu-nbd style: exactly the request
        break;
    }
    ExtentList out;
    for (uint64_t pos = off; pos < end;) {
      const uint64_t granule_end = std::min(end, (pos / g_ + 1) * g_);
      uint64_t stop = granule_end;
      // Split equal flags at an arbitrary 512-byte offset sometimes.
      if (Rand(4) == 0 && granule_end - pos > kSector) {
        stop = std::min(granule_end, (pos / kSector + 1 + Rand(4)) * kSector);
      }
      const uint32_t f = FlagsAt(pos);
      if (!out.empty() && out.back().flags == f && Rand(2) == 0) {
        out.back().length += stop - pos;
      } else {
        out.push_back(Extent{pos, stop - pos, f});
      }
      pos = stop;
    }
    return out;
  }

 private:
  std::mt19937_64* rng_;
  const uint64_t g_;
  const uint64_t size_;
  const bool bitmap_;
  std::vector<uint32_t> flags_;
};

uint64_t RandomGranule(std::mt19937_64& rng) {
  switch (rng() % 4) {
    case 0:
      return kSector << (rng() % 8);  // 512 B .. 64 KiB, powers of two
    case 1:
      return kSector * (1 + rng() % 40);  // not powers of two
    case 2:
      return 3 * kSector;
    default:
      return kSector * (1 + rng() % 7) * 16;
  }
}

TEST(GranuleBoundProperty, BoundIsAMultipleAndCoversEveryTouchedGranule) {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    std::mt19937_64 rng(seed);
    const uint64_t g = RandomGranule(rng);
    const uint64_t size = g * (1 + rng() % 50) + kSector * (rng() % 5);
    Model m(&rng, g, size, rng() % 2 == 0);
    GranuleBound bound;
    for (int op = 0; op < 200; ++op) {
      const uint64_t off = m.Rand(size / kSector) * kSector;
      const uint64_t len = kSector * (1 + m.Rand(3 * g / kSector + 8));
      bound.Observe(m.Answer(off, len));
      ASSERT_EQ(bound.bound() % g, 0u)
          << "seed " << seed << " granule " << g << " bound " << bound.bound();
      const uint64_t a = m.Rand(size);
      const uint64_t b = std::min(size, a + 1 + m.Rand(4096));
      const auto [ra, rb] = bound.RoundOut(a, b);
      ASSERT_LE(ra, a / g * g) << "seed " << seed;
      ASSERT_GE(rb, std::min(size, (b + g - 1) / g * g)) << "seed " << seed;
    }
  }
}

// Through ExtentCache: fills from the model, writes reported with the
// exact written range, checks of every cached extent after every step.
class CacheRun {
 public:
  explicit CacheRun(uint64_t seed) : rng_(seed) {
    // Small granules, so every 512-byte position is checked each step.
    g_ = kSector * (1 + Rand(16));
    size_ = g_ * (2 + Rand(30)) + kSector * Rand(3);
    for (int k = 0; k < 2; ++k) {
      models_.push_back(
          std::make_unique<Model>(&rng_, k == 0 ? g_ : 4 * g_, size_, k == 0));
    }
    ExtentCache::Options o;
    o.fetch_window_bytes = kSector * (1 + Rand(4 * g_ / kSector));
    o.read_ahead_windows = 0;
    cache_ = std::make_unique<ExtentCache>(o);
  }
  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  void Run(int steps) {
    for (int s = 0; s < steps && !::testing::Test::HasFatalFailure(); ++s) {
      const uint64_t r = Rand(100);
      if (r < 60) {
        Get(Rand(2));
      } else if (r < 95) {
        const uint64_t a = Rand(size_);
        const uint64_t b = std::min(size_, a + 1 + Rand(4095));
        for (auto& m : models_) m->Write(a, b);
        cache_->InvalidateExportRange("e", a, b - a);
      } else if (r < 98) {
        models_[0]->ClearAll();  // a new backup cleared the bitmap
        cache_->InvalidateExport("e");
      } else {
        cache_->InvalidateExport("e");  // a reconnect
      }
      CheckEveryCachedExtent();
    }
  }

 private:
  CacheKey Key(int k) const {
    return CacheKey{"e", k == 0 ? "qemu:dirty-bitmap:b" : "base:allocation"};
  }
  void Get(int k) {
    Model& m = *models_[k];
    const uint64_t off = Rand(size_);
    const uint64_t len = 1 + Rand(3 * g_);
    auto fetch = [&m](uint64_t o, uint64_t l,
                      absl::Time) -> absl::StatusOr<ExtentList> {
      return m.Answer(o, l);
    };
    absl::StatusOr<LookupResult> got =
        cache_->Get(Key(k), size_, off, len, 0, fetch, absl::InfiniteFuture());
    ASSERT_TRUE(got.ok()) << got.status();
    Check(k, got->extents);
  }
  void Check(int k, const ExtentList& extents) {
    for (const Extent& e : extents) {
      for (uint64_t p = e.offset; p < e.end(); p = (p / g_ + 1) * g_) {
        ASSERT_EQ(e.flags, models_[k]->FlagsAt(p))
            << "context " << k << " granule " << g_ << " size " << size_
            << " extent " << e << " at " << p;
      }
    }
  }
  void CheckEveryCachedExtent() {
    for (int k = 0; k < 2; ++k) {
      for (uint64_t p = 0; p < size_;) {
        const LookupResult r = cache_->Lookup(Key(k), p, size_ - p, 0);
        Check(k, r.extents);
        p = r.next_offset > p ? r.next_offset : p + kSector;
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }

  std::mt19937_64 rng_;
  uint64_t g_ = 0;
  uint64_t size_ = 0;
  std::vector<std::unique_ptr<Model>> models_;
  std::unique_ptr<ExtentCache> cache_;
};

TEST(GranuleBoundProperty, CachedExtentsStayTrueAfterWritesOfAnySize) {
  for (uint64_t seed = 1; seed <= 60; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    CacheRun(seed).Run(150);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace blockmeta
