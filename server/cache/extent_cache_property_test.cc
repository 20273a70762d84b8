// server/cache/extent_cache_property_test.cc — randomized sequences of
// lookups, fills, writes, invalidations, TTL expiry and evictions against a
// naive reference model: a per-unit truth table per key for a random disk
// layout (random unit size including 1 and 3 bytes, an export size that is
// not a multiple of the unit). The fetcher answers from the truth with
// random lengths (exact, short, past the request, past the export end,
// split at random bytes), sometimes fails and sometimes answers malformed;
// sometimes the disk is written (and invalidated) while a fetch is in
// flight, which must keep the fetched answer out of the cache.
// Every answer must equal the truth at that moment; the model also checks
// that only the gap is fetched, the window asked, the counters and the
// memory bound. Single-threaded, so every step is deterministic per seed.
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "tests/testing/cache_property_model.h"
#include "tests/testing/random_answer.h"
#include "tests/testing/status_matchers.h"

namespace blockmeta {
namespace {

using ::blockmeta::testing::StatusIs;

constexpr int kSeeds = 200;
constexpr int kOpsPerSeed = 2000;

const CacheKey& kXDirty = testing::PropertyKey(1);
const CacheKey* const kKeys[] = {&testing::PropertyKey(0), &kXDirty,
                                 &testing::PropertyKey(2)};

class PropertyRun {
 public:
  explicit PropertyRun(uint64_t seed) : rng_(seed) {
    testing::RandomDisk d =
        testing::MakeRandomDisk(8, 300, [this](uint64_t n) { return Rand(n); });
    unit_ = d.unit;
    units_ = d.units;
    size_ = d.size;
    for (int k = 0; k < 3; ++k) truth_[k] = std::move(d.truth[k]);
    ExtentCache::Options o;
    switch (Rand(3)) {
      case 0:
        o.memory_limit_bytes = 256 + Rand(4096);
        break;
      case 1:
        o.memory_limit_bytes = 16 * 1024;
        break;
      default:
        o.memory_limit_bytes = 256 << 20;
        break;
    }
    switch (Rand(3)) {
      case 0:
        o.fetch_window_bytes = 1 + Rand(unit_ * 2);
        break;
      case 1:
        o.fetch_window_bytes = unit_ * (1 + Rand(32));
        break;
      default:
        o.fetch_window_bytes = (4ull << 30) - (1ull << 20);
        break;
    }
    if (Rand(4) == 0) o.ttl = absl::Seconds(100);
    o.clock = [this] { return now_; };
    options_ = o;
    cache_ = std::make_unique<ExtentCache>(o);
  }

  void Run(int ops) {
    for (op_ = 0; op_ < ops && !::testing::Test::HasFatalFailure(); ++op_) {
      const uint64_t r = Rand(100);
      if (r < 35 || r >= 89) {  // 89+: more fills, more merging and eviction
        DoGet();
      } else if (r < 55) {
        DoLookup();
      } else if (r < 70) {
        DoWrite();
      } else if (r < 74) {
        DoClearBitmap();
      } else if (r < 84) {
        DoForget();
      } else if (r < 86) {
        DoForgetAll();
      } else if (r < 88) {
        DoClock();
      } else {
        CheckWholeDisk();
      }
    }
    CheckWholeDisk();
    EXPECT_EQ(cache_->Counters().upstream_calls, fetcher_calls_) << Where();
  }

 private:
  uint64_t Rand(uint64_t n) { return n == 0 ? 0 : rng_() % n; }
  uint32_t RandomFlags(int k) {
    return testing::RandomUnitFlags(k, [this](uint64_t n) { return Rand(n); });
  }
  int KeyIndex(const CacheKey& key) {
    for (int k = 0; k < 3; ++k) {
      if (*kKeys[k] == key) return k;
    }
    return -1;
  }
  std::string Where() const {
    return absl::StrCat("seed op ", op_, " unit ", unit_, " size ", size_,
                        " window ", options_.fetch_window_bytes, " limit ",
                        options_.memory_limit_bytes);
  }

  // A random request range (offset may lie past the end for lookups).
  std::pair<uint64_t, uint64_t> RandomRange(bool allow_past_end) {
    uint64_t off = Rand(size_ + (allow_past_end ? unit_ * 2 : 0));
    uint64_t len;
    switch (Rand(4)) {
      case 0:
        len = 1 + Rand(unit_ * 3);
        break;
      case 1:
        len = 1 + Rand(size_);
        break;
      case 2:
        len = size_ * 2 + Rand(100);
        break;
      default:
        len = unit_ * (1 + Rand(8));
        break;
    }
    return {off, len};
  }

  // Checks a result against the truth of key k for [off, off + len).
  void CheckAnswer(int k, uint64_t off, uint64_t len, size_t max_extents,
                   const LookupResult& r, const char* what,
                   const std::vector<uint32_t>* truth = nullptr) {
    if (truth == nullptr) truth = truth_;
    ASSERT_TRUE(testing::MatchesTruth(off, len, size_, unit_, r, truth[k]))
        << what << " key " << k << " " << Where();
    for (size_t i = 1; i < r.extents.size(); ++i) {
      ASSERT_NE(r.extents[i].flags, r.extents[i - 1].flags)
          << what << " unmerged neighbours " << Where();
    }
    if (max_extents != 0) {
      ASSERT_LE(r.extents.size(), max_extents) << what << Where();
    }
  }

  // The upstream: answers from the truth with a random length.
  absl::StatusOr<ExtentList> Fetch(int k, uint64_t off, uint64_t len) {
    ++fetcher_calls_;
    fetched_at_ = off;
    fetched_len_ = len;
    const uint64_t mode = Rand(100);
    if (mode < 5) {
      injected_ = absl::StatusCode::kUnavailable;
      return absl::UnavailableError("injected");
    }
    if (mode < 8) {
      injected_ = absl::StatusCode::kInternal;
      const uint32_t wrong = truth_[k][off / unit_] ^ 1;
      switch (Rand(4)) {
        case 0:
          return ExtentList{};
        case 1:
          return ExtentList{{off + 1, len, wrong}};
        case 2:
          return ExtentList{{off, 1, wrong}, {off + 2, len, wrong}};
        default:
          return ExtentList{{off, 1, wrong}, {off + 1, 0, wrong}};
      }
    }
    injected_ = absl::StatusCode::kOk;
    ExtentList out = testing::RandomUpstreamAnswer(
        off, len, truth_[k], unit_, size_, /*limit=*/0,
        [this](uint64_t n) { return Rand(n); });
    // The disk changes while the answer is on its way back: the caller may
    // use it (it was true when asked) but the cache must not keep it.
    if (Rand(10) == 0) {
      snapshot_valid_ = true;
      for (int i = 0; i < 3; ++i) snapshot_[i] = truth_[i];
      if (Rand(2)) {
        DoWrite();
      } else {
        DoClearBitmap();
      }
    }
    return out;
  }

  void DoGet() {
    const int k = static_cast<int>(Rand(3));
    auto [off, len] = RandomRange(false);
    const size_t max_extents = Rand(3) == 0 ? 1 + Rand(4) : 0;
    // What the cache knows now decides what must be fetched.
    const uint64_t end = std::min(off + len, size_);
    LookupResult head = cache_->Lookup(*kKeys[k], off, len, max_extents);
    const bool complete =
        head.next_offset >= end ||
        (max_extents != 0 && head.extents.size() >= max_extents);
    const uint64_t calls_before = fetcher_calls_;
    snapshot_valid_ = false;
    auto fetch = [&](uint64_t o, uint64_t l,
                     absl::Time) -> absl::StatusOr<ExtentList> {
      return Fetch(k, o, l);
    };
    absl::StatusOr<LookupResult> r = cache_->Get(
        *kKeys[k], size_, off, len, max_extents, fetch, absl::InfiniteFuture());
    const bool fetched = fetcher_calls_ != calls_before;
    ASSERT_EQ(fetched, !complete) << Where();
    if (fetched) {
      ASSERT_EQ(fetcher_calls_, calls_before + 1) << Where();
      ASSERT_EQ(fetched_at_, head.next_offset)
          << "fetched more than the gap " << Where();
      const uint64_t want_len =
          std::min({std::max(options_.fetch_window_bytes, end - fetched_at_),
                    kMaxNbdRequestLength, size_ - fetched_at_});
      ASSERT_EQ(fetched_len_, want_len) << Where();
    }
    if (!r.ok()) {
      ASSERT_TRUE(fetched) << r.status() << Where();
      ASSERT_THAT(r, StatusIs(injected_)) << r.status() << Where();
      return;
    }
    ASSERT_TRUE(!fetched || injected_ == absl::StatusCode::kOk) << Where();
    ASSERT_FALSE(r->extents.empty()) << Where();
    ASSERT_EQ(r->outcome, !fetched               ? Outcome::kHit
                          : head.extents.empty() ? Outcome::kMiss
                                                 : Outcome::kPartial)
        << Where();
    CheckAnswer(k, off, len, max_extents, *r, "Get",
                snapshot_valid_ ? snapshot_ : nullptr);
    ASSERT_LE(cache_->Counters().memory_bytes, options_.memory_limit_bytes)
        << Where();
  }

  void DoLookup() {
    const int k = static_cast<int>(Rand(3));
    auto [off, len] = RandomRange(true);
    const size_t max_extents = Rand(3) == 0 ? 1 + Rand(4) : 0;
    LookupResult r = cache_->Lookup(*kKeys[k], off, len, max_extents);
    if (Rand(2) == 0) cache_->Record(*kKeys[k], off, r);
    CheckAnswer(k, off, len, max_extents, r, "Lookup");
  }

  // A byte range that covers units [ua, ub), sometimes wider, unaligned.
  std::pair<uint64_t, uint64_t> CoveringRange(uint64_t ua, uint64_t ub) {
    return testing::CoveringRange(ua, ub, unit_, /*to_end_one_in=*/8,
                                  [this](uint64_t n) { return Rand(n); });
  }

  // A write through the shim: changes the export's allocation and marks
  // its bitmap dirty, then invalidates every context of the export.
  void DoWrite() {
    const testing::ModelChange c =
        testing::ApplyModelWrite(truth_, units_, /*long_run=*/50,
                                 [this](uint64_t n) { return Rand(n); });
    auto [a, l] = CoveringRange(c.ua, c.ub);
    cache_->InvalidateExportRange(c.export_name(), a, l);
    ASSERT_LE(cache_->Counters().memory_bytes, options_.memory_limit_bytes)
        << Where();
  }

  // The bitmap was cleared (e.g. after a backup): one context changes.
  void DoClearBitmap() {
    const testing::ModelChange c = testing::ApplyModelBitmapClear(
        truth_, units_, [this](uint64_t n) { return Rand(n); });
    auto [a, l] = CoveringRange(c.ua, c.ub);
    cache_->Invalidate(kXDirty, a, l);
  }

  // Forgetting without a change (InvalidateCache RPC).
  void DoForget() {
    const int k = static_cast<int>(Rand(3));
    auto [off, len] = RandomRange(true);
    const CacheCounters before = cache_->Counters(*kKeys[k]);
    ExtentCache::Dropped d =
        cache_->Invalidate(*kKeys[k], off, Rand(5) == 0 ? 0 : len);
    const CacheCounters after = cache_->Counters(*kKeys[k]);
    ASSERT_LE(d.extents, before.entries + 1) << Where();
    if (d.extents == 0) {
      ASSERT_EQ(d.bytes, 0u) << Where();
    }
    ASSERT_GE(after.entries + d.extents + (after.evictions - before.evictions),
              before.entries)
        << Where();
    // Nothing of the range is known any more.
    if (len > 0) {
      ASSERT_EQ(cache_->Lookup(*kKeys[k], off, 1, 0).outcome, Outcome::kMiss)
          << Where();
    }
  }

  void DoForgetAll() {
    if (Rand(2)) {
      cache_->InvalidateExport(Rand(2) ? "x" : "y");
    } else {
      cache_->InvalidateAll();
      ASSERT_EQ(cache_->Counters().entries, 0u) << Where();
      ASSERT_EQ(cache_->Counters().memory_bytes, 0u) << Where();
    }
  }

  void DoClock() {
    const absl::Duration d = absl::Seconds(Rand(2) ? Rand(10) : 100);
    now_ += d;
    if (options_.ttl != absl::InfiniteDuration() && d >= options_.ttl) {
      // Everything cached so far has expired.
      for (int k = 0; k < 3; ++k) {
        for (uint64_t u = 0; u < units_; ++u) {
          ASSERT_EQ(cache_->Lookup(*kKeys[k], u * unit_, 1, 0).outcome,
                    Outcome::kMiss)
              << "expired interval served " << Where();
        }
      }
    }
  }

  void CheckWholeDisk() {
    for (int k = 0; k < 3; ++k) {
      uint64_t pos = 0;
      while (pos < size_) {
        LookupResult r = cache_->Lookup(*kKeys[k], pos, size_, 0);
        CheckAnswer(k, pos, size_, 0, r, "scan");
        pos = r.next_offset == pos ? pos + 1 + Rand(unit_) : r.next_offset;
      }
    }
  }

  std::mt19937_64 rng_;
  uint64_t unit_ = 1;
  uint64_t units_ = 1;
  uint64_t size_ = 1;
  std::vector<uint32_t> truth_[3];
  // The truth before a write that landed during the last fetch.
  std::vector<uint32_t> snapshot_[3];
  bool snapshot_valid_ = false;
  ExtentCache::Options options_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  std::unique_ptr<ExtentCache> cache_;
  int op_ = 0;
  uint64_t fetcher_calls_ = 0;
  uint64_t fetched_at_ = 0;
  uint64_t fetched_len_ = 0;
  absl::StatusCode injected_ = absl::StatusCode::kOk;
};

TEST(ExtentCachePropertyTest, RandomSequencesMatchTheTruth) {
  for (int seed = 1; seed <= kSeeds; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    PropertyRun run(seed);
    run.Run(kOpsPerSeed);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace blockmeta
