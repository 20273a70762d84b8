// server/cache/extent_cache_stress_test.cc — many threads reading (Lookup,
// Get with fills), writing (truth change + InvalidateExportRange, like the
// NBD shim's write path), clearing a dirty bitmap, and forgetting ranges,
// under a tiny and a large memory limit. Meant for --config=tsan too.
//
// What "true" means under concurrent writes: the model keeps, per key and
// unit, every value the unit ever had (its versions) and the newest version
// whose invalidation has completed ("acked": the write would now be
// acknowledged to its client). A value returned by a call is correct if it
// is some version at least as new as the one acked when the call started:
// writes not yet acknowledged may or may not be visible, acknowledged ones
// must be. When all threads have stopped, the cache must equal the truth.
#include <atomic>
#include <deque>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/cache/extent_cache.h"
#include "server/common/mutex.h"

namespace blockmeta {
namespace {

constexpr uint64_t kUnit = 512;
constexpr uint64_t kUnits = 192;
constexpr uint64_t kSize = kUnit * kUnits - 100;  // unaligned end

const CacheKey kSBase{"s", "base:allocation"};
const CacheKey kSDirty{"s", "qemu:dirty-bitmap:d"};
const CacheKey kTBase{"t", "base:allocation"};
const CacheKey* const kKeys[] = {&kSBase, &kSDirty, &kTBase};

class Model {
 public:
  Model() {
    std::mt19937_64 rng(42);
    for (int k = 0; k < 3; ++k) {
      for (uint64_t u = 0; u < kUnits; ++u) {
        history_[k][u].push_back(k == 1 ? 0 : static_cast<uint32_t>(rng() % 4));
      }
    }
  }

  // Changes [ua, ub) of the given keys and returns the versions written.
  std::vector<uint64_t> Write(const std::vector<int>& keys, uint64_t ua,
                              uint64_t ub, std::mt19937_64& rng, bool dirty) {
    sync::MutexLock l(&mu_);
    std::vector<uint64_t> versions;
    for (int k : keys) {
      for (uint64_t u = ua; u < ub; ++u) {
        const uint32_t v =
            k == 1 ? (dirty ? 1u : 0u) : static_cast<uint32_t>(rng() % 4);
        history_[k][u].push_back(v);
        versions.push_back(history_[k][u].size() - 1);
      }
    }
    return versions;
  }
  // The invalidation for a Write finished.
  void Ack(const std::vector<int>& keys, uint64_t ua, uint64_t ub,
           const std::vector<uint64_t>& versions) {
    sync::MutexLock l(&mu_);
    size_t i = 0;
    for (int k : keys) {
      for (uint64_t u = ua; u < ub; ++u, ++i) {
        acked_[k][u] = std::max(acked_[k][u], versions[i]);
      }
    }
  }
  std::vector<uint64_t> AckedSnapshot(int k) {
    sync::MutexLock l(&mu_);
    return std::vector<uint64_t>(acked_[k], acked_[k] + kUnits);
  }
  // The current truth from offset, like an upstream answer.
  ExtentList Read(int k, uint64_t off, uint64_t len, std::mt19937_64& rng) {
    sync::MutexLock l(&mu_);
    ExtentList out;
    uint64_t pos = off;
    const uint64_t end = off + len;
    while (pos < end) {
      if (pos >= kSize) {
        out.push_back(Extent{pos, end - pos, 0x40});  // past the end
        break;
      }
      const uint32_t f = history_[k][pos / kUnit].back();
      uint64_t u = pos / kUnit + 1;
      while (u < kUnits && history_[k][u].back() == f) ++u;
      uint64_t e = std::min({u * kUnit, kSize, end});
      if (e - pos > 1 && rng() % 3 == 0) e = pos + 1 + rng() % (e - pos - 1);
      out.push_back(Extent{pos, e - pos, f});
      pos = e;
    }
    return out;
  }
  // "" if every unit of every extent had, at some version >= acked, the
  // extent's flags; else a description of the first violation.
  std::string Check(int k, const std::vector<uint64_t>& acked,
                    const ExtentList& extents) {
    sync::MutexLock l(&mu_);
    for (const Extent& e : extents) {
      for (uint64_t u = e.offset / kUnit; u * kUnit < e.end(); ++u) {
        if (u >= kUnits) return absl::StrCat("extent past the end ", e.offset);
        const std::vector<uint32_t>& h = history_[k][u];
        bool ok = false;
        for (uint64_t v = acked[u]; v < h.size() && !ok; ++v) {
          ok = h[v] == e.flags;
        }
        if (!ok) {
          return absl::StrCat("key ", k, " unit ", u, " got flags ", e.flags,
                              " not seen since acked version ", acked[u],
                              " (now ", h.back(), ")");
        }
      }
    }
    return "";
  }
  uint32_t Current(int k, uint64_t u) {
    sync::MutexLock l(&mu_);
    return history_[k][u].back();
  }

 private:
  sync::Mutex mu_;
  std::vector<uint32_t> history_[3][kUnits] ABSL_GUARDED_BY(mu_);
  uint64_t acked_[3][kUnits] ABSL_GUARDED_BY(mu_) = {};
};

std::string CheckShape(uint64_t off, uint64_t len, const LookupResult& r) {
  uint64_t pos = off;
  const uint64_t end = std::min(off + len, kSize);
  for (const Extent& e : r.extents) {
    if (e.offset != pos || e.length == 0 || e.end() > end) {
      return absl::StrCat("bad extent ", e.offset, "+", e.length, " at ", pos,
                          " end ", end);
    }
    pos = e.end();
  }
  if (r.next_offset != pos) return "next_offset mismatch";
  return "";
}

void RunStress(uint64_t memory_limit, uint64_t window, int reader_ops,
               int writer_ops) {
  ExtentCache::Options o;
  o.memory_limit_bytes = memory_limit;
  o.fetch_window_bytes = window;
  ExtentCache cache(o);
  Model model;
  std::atomic<uint64_t> fetches{0}, errors{0}, checked{0};
  std::atomic<bool> failed{false};
  std::string failure;
  sync::Mutex failure_mu;
  auto fail = [&](const std::string& what) {
    sync::MutexLock l(&failure_mu);
    if (!failed.exchange(true)) failure = what;
  };

  auto reader = [&](int id) {
    std::mt19937_64 rng(1000 + id);
    for (int i = 0; i < reader_ops && !failed.load(); ++i) {
      const int k = static_cast<int>(rng() % 3);
      const uint64_t off = rng() % kSize;
      const uint64_t len =
          rng() % 2 ? 1 + rng() % (4 * kUnit) : 1 + rng() % kSize;
      const size_t max_extents = rng() % 4 == 0 ? 1 + rng() % 3 : 0;
      const std::vector<uint64_t> acked = model.AckedSnapshot(k);
      LookupResult r;
      if (rng() % 3 == 0) {
        r = cache.Lookup(*kKeys[k], off, len, max_extents);
      } else {
        auto fetch = [&](uint64_t fo, uint64_t fl,
                         absl::Time) -> absl::StatusOr<ExtentList> {
          fetches.fetch_add(1);
          if (rng() % 20 == 0) return absl::UnavailableError("injected");
          const uint64_t answer =
              rng() % 3 == 0 ? 1 + rng() % fl : fl + rng() % (2 * kUnit);
          ExtentList out = model.Read(k, fo, answer, rng);
          if (rng() % 4 == 0) std::this_thread::yield();  // widen races
          return out;
        };
        absl::StatusOr<LookupResult> got =
            cache.Get(*kKeys[k], kSize, off, len, max_extents, fetch,
                      absl::Now() + absl::Seconds(60));
        if (!got.ok()) {
          if (got.status().code() != absl::StatusCode::kUnavailable) {
            fail(absl::StrCat("unexpected error ", got.status().ToString()));
          }
          errors.fetch_add(1);
          continue;
        }
        if (got->extents.empty()) fail("Get returned no extents");
        r = *std::move(got);
      }
      std::string bad = CheckShape(off, len, r);
      if (bad.empty()) bad = model.Check(k, acked, r.extents);
      if (!bad.empty()) fail(bad);
      checked.fetch_add(1);
    }
  };

  // Asynchronous readers: fetches are answered (as read at issue time, the
  // upstream's read point) by a completer thread, callers often give up at
  // short deadlines (detached waits), and read-ahead runs.
  sync::Mutex q_mu;
  absl::CondVar q_cv;
  // Guarded by q_mu (locals cannot carry the annotation):
  std::deque<std::pair<absl::StatusOr<ExtentList>, FetchDone>> queue;
  bool q_stop = false;
  std::mt19937_64 async_rng(5000);
  auto async_fetch_for = [&](int k) -> AsyncFetcher {
    return [&, k](uint64_t fo, uint64_t fl, FetchDone done) {
      fetches.fetch_add(1);
      sync::MutexLock l(&q_mu);
      absl::StatusOr<ExtentList> answer;
      if (async_rng() % 20 == 0) {
        answer = absl::UnavailableError("injected");
      } else {
        const uint64_t len = async_rng() % 3 == 0
                                 ? 1 + async_rng() % fl
                                 : fl + async_rng() % (2 * kUnit);
        answer = model.Read(k, fo, len, async_rng);
      }
      queue.emplace_back(std::move(answer), std::move(done));
      q_cv.SignalAll();
    };
  };
  auto completer = [&] {
    for (;;) {
      std::pair<absl::StatusOr<ExtentList>, FetchDone> item;
      {
        sync::MutexLock l(&q_mu);
        while (queue.empty() && !q_stop) {
          q_mu.WaitWithDeadline(&q_cv, absl::InfiniteFuture());
        }
        if (queue.empty()) return;
        // Out of order, as NBD replies may come.
        const size_t i = async_rng() % queue.size();
        item = std::move(queue[i]);
        queue.erase(queue.begin() + i);
      }
      std::move(item.second)(std::move(item.first));
    }
  };
  auto async_reader = [&](int id) {
    std::mt19937_64 rng(6000 + id);
    for (int i = 0; i < reader_ops / 2 && !failed.load(); ++i) {
      const int k = static_cast<int>(rng() % 3);
      // Scans (sequential offsets) half the time, random otherwise.
      const uint64_t off = rng() % kSize;
      const uint64_t len = 1 + rng() % kSize;
      const size_t max_extents = rng() % 4 == 0 ? 1 + rng() % 3 : 0;
      const std::vector<uint64_t> acked = model.AckedSnapshot(k);
      const absl::Duration wait =
          rng() % 3 == 0 ? absl::Microseconds(rng() % 2000) : absl::Seconds(60);
      absl::StatusOr<LookupResult> got =
          cache.Get(*kKeys[k], kSize, off, len, max_extents, async_fetch_for(k),
                    absl::Now() + wait);
      if (!got.ok()) {
        if (got.status().code() != absl::StatusCode::kUnavailable &&
            got.status().code() != absl::StatusCode::kDeadlineExceeded) {
          fail(absl::StrCat("unexpected error ", got.status().ToString()));
        }
        errors.fetch_add(1);
        continue;
      }
      if (got->extents.empty()) fail("async Get returned no extents");
      std::string bad = CheckShape(off, len, *got);
      if (bad.empty()) bad = model.Check(k, acked, got->extents);
      if (!bad.empty()) fail(absl::StrCat("async: ", bad));
      checked.fetch_add(1);
    }
  };

  auto writer = [&](int id) {
    std::mt19937_64 rng(2000 + id);
    for (int i = 0; i < writer_ops && !failed.load(); ++i) {
      const bool s = rng() % 3 != 0;
      const uint64_t ua = rng() % kUnits;
      const uint64_t ub = std::min(kUnits, ua + 1 + rng() % 8);
      const std::vector<int> keys =
          s ? std::vector<int>{0, 1} : std::vector<int>{2};
      const std::vector<uint64_t> versions =
          model.Write(keys, ua, ub, rng, /*dirty=*/true);
      // Unaligned but covering: a shim passes the client's byte range.
      const uint64_t a = ua * kUnit - (ua > 0 ? rng() % kUnit : 0);
      cache.InvalidateExportRange(s ? "s" : "t", a, ub * kUnit - a);
      model.Ack(keys, ua, ub, versions);
    }
  };

  auto bitmap_clearer = [&] {
    std::mt19937_64 rng(3000);
    for (int i = 0; i < writer_ops && !failed.load(); ++i) {
      const uint64_t ua = rng() % kUnits;
      const uint64_t ub = std::min(kUnits, ua + 1 + rng() % 32);
      const std::vector<uint64_t> versions =
          model.Write({1}, ua, ub, rng, /*dirty=*/false);
      cache.Invalidate(kSDirty, ua * kUnit, (ub - ua) * kUnit);
      model.Ack({1}, ua, ub, versions);
    }
  };

  auto forgetter = [&] {
    std::mt19937_64 rng(4000);
    for (int i = 0; i < writer_ops && !failed.load(); ++i) {
      switch (rng() % 10) {
        case 0:
          cache.InvalidateExport(rng() % 2 ? "s" : "t");
          break;
        case 1:
          cache.InvalidateAll();
          break;
        default:
          cache.Invalidate(*kKeys[rng() % 3], rng() % kSize, rng() % kSize);
      }
      if (rng() % 8 == 0) cache.Counters();  // races with everything
      std::this_thread::yield();
    }
  };

  std::vector<std::thread> threads;
  threads.reserve(4 + 2 + 2 + 2);
  std::thread completer_thread(completer);
  for (int i = 0; i < 4; ++i) threads.emplace_back(reader, i);
  for (int i = 0; i < 2; ++i) threads.emplace_back(async_reader, i);
  for (int i = 0; i < 2; ++i) threads.emplace_back(writer, i);
  threads.emplace_back(bitmap_clearer);
  threads.emplace_back(forgetter);
  for (auto& t : threads) t.join();
  {
    // Drain: detached fetches and read-ahead still in flight land now.
    sync::MutexLock l(&q_mu);
    q_stop = true;
    q_cv.SignalAll();
  }
  completer_thread.join();
  ASSERT_FALSE(failed.load()) << failure;

  // Quiescent: every write is acknowledged, the cache equals the truth.
  for (int k = 0; k < 3; ++k) {
    for (uint64_t u = 0; u < kUnits; ++u) {
      LookupResult r = cache.Lookup(*kKeys[k], u * kUnit, 1, 0);
      for (const Extent& e : r.extents) {
        ASSERT_EQ(e.flags, model.Current(k, u)) << "key " << k << " unit " << u;
      }
    }
  }
  const CacheCounters c = cache.Counters();
  EXPECT_EQ(c.upstream_calls, fetches.load());
  EXPECT_GT(checked.load(), uint64_t(reader_ops));
  EXPECT_LE(c.memory_bytes, memory_limit);
  std::cout << "checked " << checked.load() << " answers, " << fetches.load()
            << " fetches, " << errors.load() << " injected errors, "
            << c.coalesced_waits << " coalesced waits, " << c.evictions
            << " evictions, " << c.stale_fills_dropped
            << " stale fills dropped, " << c.detached_waits
            << " detached waits, " << c.read_ahead_issued
            << " read-ahead fetches\n";
}

TEST(ExtentCacheStressTest, TinyMemoryAndSmallWindow) {
  RunStress(/*memory_limit=*/4096, /*window=*/8 * kUnit, 15000, 3000);
}

TEST(ExtentCacheStressTest, LargeMemoryAndWholeDiskWindow) {
  RunStress(/*memory_limit=*/256 << 20, /*window=*/1ull << 30, 15000, 3000);
}

}  // namespace
}  // namespace blockmeta
