// server/cache/read_ahead.cc — read-ahead scheduling (see read_ahead.h).
#include "server/cache/read_ahead.h"

#include <algorithm>

namespace blockmeta {
namespace cache_internal {

void ReadAheadScheduler::UpdateLiveLocked(KeyState& k) {
  const bool live =
      k.ra.window > 0 && k.ra.fetcher != nullptr &&
      (k.ra.inflight > 0 || !k.ra.unread.empty() || k.ra.frontier < k.ra.limit);
  k.ra_live.store(live, std::memory_order_relaxed);
}

void ReadAheadScheduler::EndRunLocked(KeyState& k) {
  ReadAheadRun& ra = k.ra;
  k.read_ahead_wasted.Add(ra.unread.size());
  ra.unread.clear();
  ra.frontier = ra.limit = 0;
  ra.fetcher.reset();
  UpdateLiveLocked(k);
}

uint64_t ReadAheadScheduler::FillBudgetLocked(const KeyState& k) const {
  const uint64_t half = memory_limit_bytes_ / 2;
  return k.ra.inflight == 0 ? half : half / (1 + k.ra.inflight);
}

void ReadAheadScheduler::PlanLocked(
    KeyState& k, uint64_t gap, uint64_t demand_end, uint64_t request_end,
    uint64_t export_size, const std::shared_ptr<const AsyncFetcher>& fetcher,
    std::vector<FetchPtr>* issue) const {
  const uint64_t n = windows_;
  if (n == 0) return;
  ReadAheadRun& ra = k.ra;
  const bool continuing = ra.fetcher != nullptr && ra.frontier > gap &&
                          ra.frontier <= SatAdd(gap, (n + 1) * ra.window);
  uint64_t window, from, limit;
  if (ra.window > 0 && gap <= ra.run_end &&
      SatAdd(gap, ra.window) >= ra.run_end) {
    // The gap is in the last window of a short-answered run: the demand
    // fetch will likely answer one window; fetch the ones after it too.
    window = ra.window;
    from = continuing ? ra.frontier : SatAdd(gap, window);
    limit = export_size;
  } else if (request_end > demand_end) {
    // A request beyond one window (a cold map of a large disk).
    window = demand_end - gap;
    from = continuing && ra.window == window ? ra.frontier : demand_end;
    limit = request_end;
  } else {
    return;
  }
  if (!continuing) EndRunLocked(k);
  ra.window = window;
  ra.frontier = from;
  ra.limit = std::min(limit, export_size);
  ra.read_pos = std::max(continuing ? ra.read_pos : 0, gap);
  ra.export_size = export_size;
  ra.fetcher = fetcher;
  TopUpLocked(k, issue);
}

void ReadAheadScheduler::TopUpLocked(KeyState& k,
                                     std::vector<FetchPtr>* issue) const {
  ReadAheadRun& ra = k.ra;
  const uint64_t n = windows_;
  if (ra.window == 0 || ra.fetcher == nullptr || n == 0) return;
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
  while (ra.inflight < allowed && ra.frontier < ra.limit &&
         ra.frontier < horizon) {
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
      const size_t cap = 2 * size_t{static_cast<size_t>(windows_)} + 2;
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
    ra.est_bytes = answer_extents * kIntervalBytes;
  }
  UpdateLiveLocked(k);
}

}  // namespace cache_internal
}  // namespace blockmeta
