// server/cache/read_ahead.cc — read-ahead scheduling (see read_ahead.h).
#include "server/cache/read_ahead.h"

#include <algorithm>

namespace blockmeta {
namespace cache_internal {
namespace {

// Caps the walk streak so it never wraps.
constexpr uint32_t kMaxStreak = 1u << 20;

// A request for at least a quarter of the window the cache would fetch
// there announces a scan (qemu's REQ_ONE asks for 2 GiB per extent).
bool LongRequest(uint64_t from, uint64_t request_end, uint64_t export_size,
                 uint64_t window) {
  if (request_end <= from) return false;
  uint64_t w = window;
  if (export_size > from) w = std::min(w, export_size - from);
  return (request_end - from) >= std::max<uint64_t>(1, w / 4);
}

template <typename T>
void StoreIfChanged(std::atomic<T>& a, T v) {
  if (a.load(std::memory_order_relaxed) != v) {
    a.store(v, std::memory_order_relaxed);
  }
}

}  // namespace

void ReadAheadScheduler::UpdateLiveLocked(KeyState& k) {
  const bool live = k.ra.window > 0 && k.ra.fetcher != nullptr &&
                    (k.ra.inflight > 0 || !k.ra.unread.empty());
  // Stores only what changed: the hit path reads these from other cores.
  StoreIfChanged(k.ra_live, live);
  uint64_t covered = 0;
  if (k.ra.fetcher != nullptr && k.ra.window > 0) {
    covered = k.ra.frontier >= k.ra.limit && k.ra.limit >= k.ra.export_size
                  ? kMaxU64
                  : k.ra.frontier;
  } else if (k.ra.last_fetcher == nullptr) {
    covered = kMaxU64;  // no fetcher known: a walk cannot read ahead
  }
  StoreIfChanged(k.ra_covered, covered);
  StoreIfChanged(k.ra_window_hint, k.ra.fetcher != nullptr ? k.ra.window : 0);
}

void ReadAheadScheduler::EndRunLocked(KeyState& k) {
  ReadAheadRun& ra = k.ra;
  k.read_ahead_wasted.Add(ra.unread.size());
  ra.unread.clear();
  ra.frontier = ra.limit = 0;
  ra.fetcher.reset();
  UpdateLiveLocked(k);
}

void ReadAheadScheduler::ForgetLocked(KeyState& k) {
  EndRunLocked(k);
  EndPrefetchLocked(k, /*completed=*/false);
  k.ra.last_fetcher.reset();
  UpdateLiveLocked(k);
}

uint64_t ReadAheadScheduler::FillBudgetLocked(const KeyState& k) const {
  const uint64_t half = memory_limit_bytes_ / 2;
  const size_t inflight = k.ra.inflight + k.pf.inflight;
  return inflight == 0 ? half : half / (1 + inflight);
}

bool ReadAheadScheduler::IsWalk(const KeyState& k, uint64_t from,
                                uint64_t request_end,
                                uint64_t export_size) const {
  const uint64_t we = k.walk_end.load(std::memory_order_relaxed);
  const uint64_t w = WalkWindow(k.ra);
  if (from > SatAdd(we, w) || request_end <= we) return false;
  return k.walk_streak.load(std::memory_order_relaxed) + 1 >= 2 ||
         LongRequest(from, request_end, export_size, w);
}

ReadAheadScheduler::Step ReadAheadScheduler::WalkStep(
    KeyState& k, uint64_t from, uint64_t to, uint64_t request_end,
    uint64_t export_size) const {
  Step step;
  step.lock = k.ra_live.load(std::memory_order_relaxed);
  if (windows_ == 0 || to <= from) return step;
  const uint64_t we = k.walk_end.load(std::memory_order_relaxed);
  uint64_t w = k.ra_window_hint.load(std::memory_order_relaxed);
  if (w == 0) w = fetch_window_;
  if (from <= SatAdd(we, w) && to > we) {
    // Continues the walk (the first read near offset 0 included).
    k.walk_end.store(to, std::memory_order_relaxed);
    const uint32_t s = k.walk_streak.load(std::memory_order_relaxed);
    if (s < kMaxStreak) {
      k.walk_streak.store(s + 1, std::memory_order_relaxed);
    }
    step.walk = s + 1 >= 2 || (request_end != 0 &&
                               LongRequest(from, request_end, export_size, w));
  } else if (to > we ? from > SatAdd(we, w) : SatAdd(to, w) < we) {
    // A jump: a walk may start here.
    k.walk_end.store(to, std::memory_order_relaxed);
    StoreIfChanged(k.walk_streak, 1u);
  }  // else a re-read inside the walk: nothing changes
  if (step.walk) {
    const uint64_t covered = k.ra_covered.load(std::memory_order_relaxed);
    const uint64_t ahead =
        windows_ + 1 > kMaxU64 / w ? kMaxU64 : w * (windows_ + 1);
    if (covered != kMaxU64 && SatAdd(to, ahead) > covered) step.lock = true;
  }
  return step;
}

void ReadAheadScheduler::OnHandOutLocked(KeyState& k, uint64_t from,
                                         uint64_t to, bool walk,
                                         std::vector<FetchPtr>* issue) const {
  NoteReadLocked(k, from, to);
  ReadAheadRun& ra = k.ra;
  if (!walk || windows_ == 0 || PrefetchActiveLocked(k)) {
    TopUpLocked(k, issue);
    return;
  }
  if (ra.fetcher != nullptr && ra.frontier >= to &&
      ra.frontier <= SatAdd(to, (windows_ + 2) * ra.window)) {
    // Following the run (a long request's run keeps its request end: a
    // walk past it starts a run of its own).
    ra.read_pos = std::max(ra.read_pos, to);
    TopUpLocked(k, issue);
    return;
  }
  if (ra.fetcher != nullptr && ra.frontier >= ra.limit &&
      ra.limit >= ra.export_size) {
    UpdateLiveLocked(k);
    return;  // the run already reached the export end
  }
  std::shared_ptr<const AsyncFetcher> fetcher =
      ra.fetcher != nullptr ? ra.fetcher : ra.last_fetcher;
  const uint64_t size =
      ra.fetcher != nullptr ? ra.export_size : ra.last_export_size;
  if (fetcher == nullptr || to >= size) {
    UpdateLiveLocked(k);
    return;
  }
  k.read_ahead_walks.Add(1);
  StartLocked(k, WalkWindow(ra), to, size, to, size, fetcher, issue);
}

void ReadAheadScheduler::StartLocked(
    KeyState& k, uint64_t window, uint64_t from, uint64_t limit,
    uint64_t read_pos, uint64_t export_size,
    const std::shared_ptr<const AsyncFetcher>& fetcher,
    std::vector<FetchPtr>* issue) const {
  EndRunLocked(k);
  ReadAheadRun& ra = k.ra;
  ra.window = window;
  ra.frontier = from;
  ra.limit = std::min(limit, export_size);
  ra.read_pos = read_pos;
  ra.export_size = export_size;
  ra.fetcher = fetcher;
  TopUpLocked(k, issue);
}

void ReadAheadScheduler::PlanLocked(
    KeyState& k, uint64_t from, uint64_t gap, uint64_t demand_end,
    uint64_t request_end, uint64_t export_size,
    const std::shared_ptr<const AsyncFetcher>& fetcher,
    std::vector<FetchPtr>* issue) const {
  const uint64_t n = windows_;
  if (n == 0) return;
  ReadAheadRun& ra = k.ra;
  if (ra.last_fetcher != fetcher) {
    ra.last_fetcher = fetcher;
    ra.last_export_size = export_size;
    if (ra.fetcher == nullptr) UpdateLiveLocked(k);
  }
  // The frontier runs up to n + 1 windows past the read position, which
  // may be anywhere in the window before the gap.
  if (PrefetchActiveLocked(k)) return;  // it maps everything already
  const bool continuing = ra.fetcher != nullptr && ra.frontier > gap &&
                          ra.frontier <= SatAdd(gap, (n + 2) * ra.window);
  uint64_t window, start, limit;
  if (ra.window > 0 && gap <= ra.run_end &&
      SatAdd(gap, ra.window) >= ra.run_end) {
    // The gap is in the last window of a short-answered run: the demand
    // fetch will likely answer one window; fetch the ones after it too.
    window = ra.window;
    start = continuing ? ra.frontier : SatAdd(gap, window);
    limit = export_size;
  } else if (request_end > demand_end) {
    // A request beyond one window (a cold map of a large disk).
    window = demand_end - gap;
    start = continuing && ra.window == window ? ra.frontier : demand_end;
    limit = request_end;
  } else if (IsWalk(k, from, request_end, export_size)) {
    // A walk by position (REQ_ONE clients): windows to the export end.
    window = WalkWindow(ra);
    start = continuing && ra.window == window ? ra.frontier : demand_end;
    limit = export_size;
    if (!continuing) k.read_ahead_walks.Add(1);
  } else {
    return;
  }
  if (!continuing) {
    StartLocked(k, window, start, limit, gap, export_size, fetcher, issue);
    return;
  }
  ra.window = window;
  ra.frontier = start;
  ra.limit = std::max(ra.limit, std::min(limit, export_size));
  ra.read_pos = std::max(ra.read_pos, gap);
  ra.export_size = export_size;
  ra.fetcher = fetcher;
  TopUpLocked(k, issue);
}

uint64_t ReadAheadScheduler::CoveredEndLocked(const KeyState& k, uint64_t pos,
                                              uint64_t to, uint64_t expect) {
  bool moved = true;
  while (moved && pos < to) {
    moved = false;
    auto it = k.map.upper_bound(pos);
    if (it != k.map.begin()) {
      --it;
      // Contiguous cached intervals (adjacent ones differ in flags).
      while (it != k.map.end() && it->first <= pos && it->second.end > pos &&
             pos < to) {
        pos = it->second.end;
        moved = true;
        ++it;
      }
    }
    for (const FetchPtr& f : k.inflight) {
      const uint64_t f_end = std::min(f->end, SatAdd(f->start, expect));
      if (f->start <= pos && pos < f_end) {
        pos = f_end;
        moved = true;
      }
    }
  }
  return pos;
}

void ReadAheadScheduler::TopUpLocked(KeyState& k,
                                     std::vector<FetchPtr>* issue) const {
  ReadAheadRun& ra = k.ra;
  const uint64_t n = windows_;
  if (ra.window == 0 || ra.fetcher == nullptr || n == 0) {
    UpdateLiveLocked(k);
    return;
  }
  // As many windows as half the memory bound holds, at least one.
  uint64_t allowed = n;
  if (ra.est_bytes > 0) {
    allowed = std::min<uint64_t>(
        n, std::max<uint64_t>(1, memory_limit_bytes_ / 2 / ra.est_bytes));
  }
  // The window at read_pos is the scan's own (demand) fetch; read-ahead
  // covers the `allowed` windows after it.
  const uint64_t horizon = SatAdd(ra.read_pos, allowed + 1 > kMaxU64 / ra.window
                                                   ? kMaxU64
                                                   : ra.window * (allowed + 1));
  const uint64_t stop = std::min(ra.limit, horizon);
  while (ra.frontier < stop) {
    // Never fetch what is cached or already being fetched.
    // A fetch in flight is expected to answer one run window (a
    // window-limited upstream answers less than it was asked for).
    const uint64_t skip = CoveredEndLocked(k, ra.frontier, stop, ra.window);
    if (skip > ra.frontier) {
      ra.frontier = std::min(skip, ra.limit);
      continue;
    }
    if (ra.inflight >= allowed) break;
    const uint64_t start = ra.frontier;
    const uint64_t end = std::min(
        {SatAdd(start, ra.window), ra.limit, start + kMaxNbdRequestLength});
    issue->push_back(k.RegisterLocked(start, end, /*read_ahead=*/true));
    ++ra.inflight;
    k.read_ahead_issued.Add(1);
    ra.frontier = end;
  }
  UpdateLiveLocked(k);
}

void ReadAheadScheduler::NoteReadLocked(KeyState& k, uint64_t from,
                                        uint64_t to) {
  ReadAheadRun& ra = k.ra;
  if (ra.window == 0 || to <= from) return;
  // A read behind the frontier is the scan (or a reader of its windows).
  if (from <= ra.frontier && to > ra.read_pos) ra.read_pos = to;
  auto& u = ra.unread;
  for (auto it = u.begin(); it != u.end();) {
    if (it->first < to && from < it->second) {
      k.read_ahead_hits.Add(1);
      it = u.erase(it);
    } else {
      ++it;
    }
  }
  // Windows the scan has passed without reading are wasted.
  while (!u.empty() && u.front().second <= from &&
         from - u.front().second > ra.window) {
    k.read_ahead_wasted.Add(1);
    u.erase(u.begin());
  }
}

void ReadAheadScheduler::OnCompleteLocked(KeyState& k, const Fetch& f, bool ok,
                                          uint64_t answer_end,
                                          size_t answer_extents,
                                          uint64_t export_size,
                                          std::vector<FetchPtr>* issue) const {
  ReadAheadRun& ra = k.ra;
  if (!ok) {
    if (f.read_ahead && !f.read) k.read_ahead_wasted.Add(1);
    UpdateLiveLocked(k);
    return;
  }
  if (f.read_ahead) {
    ra.run_end = std::max(ra.run_end, answer_end);
    ra.est_bytes = answer_extents * kIntervalBytes;
    if (!f.read && f.clean_end == answer_end) {
      ra.unread.emplace_back(f.start, answer_end);
      const size_t cap = 2 * static_cast<size_t>(windows_) + 2;
      if (ra.unread.size() > cap) {
        ra.unread.erase(ra.unread.begin());
        k.read_ahead_wasted.Add(1);
      }
    }
    TopUpLocked(k, issue);
  } else if (answer_end < f.end && answer_end < export_size) {
    // Answered shorter than asked: a window-limited upstream. The next
    // scan step at answer_end starts read-ahead of this length.
    if (ra.window != answer_end - f.start || ra.run_end < f.start ||
        ra.run_end > answer_end + ra.window) {
      ra.run_end = answer_end;
    } else {
      ra.run_end = std::max(ra.run_end, answer_end);
    }
    ra.window = answer_end - f.start;
    ra.learned_window = ra.window;
    ra.est_bytes = answer_extents * kIntervalBytes;
  } else if (answer_end >= f.end) {
    ra.learned_window = 0;  // answered in full: not window-limited
  }
  UpdateLiveLocked(k);
}

// --- Whole-map prefetch ---

void ReadAheadScheduler::EndPrefetchLocked(KeyState& k, bool completed) {
  PrefetchRun& pf = k.pf;
  if (!pf.started || pf.done) return;
  pf.done = true;
  pf.fetcher.reset();
  if (completed) k.prefetch_completed.Add(1);
}

void ReadAheadScheduler::MaybeStartPrefetchLocked(
    KeyState& k, uint64_t export_size,
    const std::shared_ptr<const AsyncFetcher>& fetcher, bool pressure,
    std::vector<FetchPtr>* issue) const {
  PrefetchRun& pf = k.pf;
  if (pf.started || k.prefetch_parallel.load(std::memory_order_relaxed) == 0) {
    return;
  }
  pf.started = true;
  pf.frontier = 0;
  pf.export_size = export_size;
  pf.fetcher = fetcher;
  TopUpPrefetchLocked(k, pressure, issue);
}

void ReadAheadScheduler::TopUpPrefetchLocked(
    KeyState& k, bool pressure, std::vector<FetchPtr>* issue) const {
  PrefetchRun& pf = k.pf;
  if (!pf.started || pf.done) return;
  if (pressure) return EndPrefetchLocked(k, /*completed=*/false);
  // Yield to the callers' own fetches of this key: each takes a slot.
  size_t demand = 0;
  for (const FetchPtr& f : k.inflight) {
    if (!f->read_ahead && !f->prefetch) ++demand;
  }
  uint64_t allowed = k.prefetch_parallel.load(std::memory_order_relaxed);
  allowed = allowed > demand ? allowed - demand : 0;
  if (pf.est_bytes > 0) {  // and what half the memory bound holds
    allowed = std::min<uint64_t>(
        allowed, std::max<uint64_t>(1, memory_limit_bytes_ / 2 / pf.est_bytes));
  }
  const uint64_t window = WalkWindow(k.ra);
  while (pf.frontier < pf.export_size) {
    const uint64_t skip =
        CoveredEndLocked(k, pf.frontier, pf.export_size, window);
    if (skip > pf.frontier) {
      pf.frontier = skip;
      continue;
    }
    if (pf.inflight >= allowed) break;
    const uint64_t start = pf.frontier;
    const uint64_t end = std::min(
        {SatAdd(start, window), pf.export_size, start + kMaxNbdRequestLength});
    FetchPtr f = k.RegisterLocked(start, end, /*read_ahead=*/false);
    f->prefetch = true;
    issue->push_back(std::move(f));
    ++pf.inflight;
    k.prefetch_issued.Add(1);
    pf.frontier = end;
  }
  if (pf.frontier >= pf.export_size && pf.inflight == 0) {
    EndPrefetchLocked(k, /*completed=*/true);
  }
}

void ReadAheadScheduler::OnPrefetchDoneLocked(
    KeyState& k, const Fetch& f, bool ok, uint64_t answer_end,
    size_t answer_extents, bool pressure, std::vector<FetchPtr>* issue) const {
  PrefetchRun& pf = k.pf;
  if (!pf.started || pf.done) return;
  if (!ok) return EndPrefetchLocked(k, /*completed=*/false);
  pf.est_bytes = answer_extents * kIntervalBytes;
  k.prefetch_bytes.Add(f.clean_end - f.start);
  // Fetch again what this window did not bring (a short answer, or the
  // part a write cut): the frontier goes back to where it stopped.
  const uint64_t brought = std::min(answer_end, f.clean_end);
  if (brought < f.end) pf.frontier = std::min(pf.frontier, brought);
  TopUpPrefetchLocked(k, pressure, issue);
}

}  // namespace cache_internal
}  // namespace blockmeta
