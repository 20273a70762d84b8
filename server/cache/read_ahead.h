// server/cache/read_ahead.h — read-ahead scheduling for one key's scan
// (internal to server/cache).
//
// A ReadAheadScheduler decides which windows of a key to fetch before any
// caller asks for them; the cache registers the windows it returns as fetch
// records (so they obey single-flight and the poison rule like any fetch)
// and issues them with no lock held. All methods require the key's lock.
//
// Rules: at most Options::read_ahead_windows read-ahead fetches in flight
// per key (other keys and other callers are never queued behind them);
// windows stop at the run's limit (export end, or the request end for long
// requests); at most what half the memory bound holds is in flight, judged
// by the last window's answer size.
#ifndef BLOCKMETA_SERVER_CACHE_READ_AHEAD_H_
#define BLOCKMETA_SERVER_CACHE_READ_AHEAD_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "server/cache/fetcher.h"
#include "server/cache/key_state.h"

namespace blockmeta {
namespace cache_internal {

class ReadAheadScheduler {
 public:
  ReadAheadScheduler(uint32_t windows, uint64_t memory_limit_bytes)
      : windows_(windows), memory_limit_bytes_(memory_limit_bytes) {}

  // A caller registered its own fetch [gap, demand_end) for a request that
  // ends at request_end. Starts (or continues) a run when the gap is in the
  // last window of a short-answered run, or the request reaches beyond the
  // demand window; windows to issue go to *issue.
  void PlanLocked(KeyState& k, uint64_t gap, uint64_t demand_end,
                  uint64_t request_end, uint64_t export_size,
                  const std::shared_ptr<const AsyncFetcher>& fetcher,
                  std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Issues windows at the frontier while fewer than the allowed number are
  // in flight and the scan is close enough.
  void TopUpLocked(KeyState& k, std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // The scan read [from, to): counts read-ahead hits, advances read_pos.
  static void NoteReadLocked(KeyState& k, uint64_t from, uint64_t to)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Fetch f of k completed: it no longer counts as in flight (called
  // first, before the fill budget is computed).
  static void RetireLocked(KeyState& k, const Fetch& f)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu) {
    if (f.read_ahead) --k.ra.inflight;
  }
  // Fetch f of k completed and was retired. ok: whether it
  // answered; answer_end / answer_extents: its answer, when ok (clipped,
  // before any poison cut). Learns the window of a short-answered demand
  // fetch, and keeps the run going after one of its windows.
  void OnCompleteLocked(KeyState& k, const Fetch& f, bool ok,
                        uint64_t answer_end, size_t answer_extents,
                        uint64_t export_size,
                        std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Memory one fill may insert: half the bound, shared with the key's
  // read-ahead windows in flight.
  uint64_t FillBudgetLocked(const KeyState& k) const
      ABSL_SHARED_LOCKS_REQUIRED(k.mu);

 private:
  // Ends a run: its unread windows are wasted.
  static void EndRunLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  static void UpdateLiveLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);

  const uint64_t windows_;
  const uint64_t memory_limit_bytes_;
};

}  // namespace cache_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_READ_AHEAD_H_
