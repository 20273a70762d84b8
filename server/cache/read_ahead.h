// server/cache/read_ahead.h — read-ahead scheduling for one key's scan
// (internal to server/cache).
//
// A ReadAheadScheduler decides which windows of a key to fetch before any
// caller asks for them; the cache registers the windows it returns as fetch
// records (so they obey single-flight and the poison rule like any fetch)
// and issues them with no lock held.
//
// A run starts when a key is being scanned, detected three ways:
// * by position (a walk): reads that each start within one window after
//   the highest offset the walk handed out (the first read at 0 included)
//   and end past it. Two such reads in a row, or one that asks for at least
//   a quarter of a window (qemu's REQ_ONE requests ask for 2 GiB and get one
//   extent inside a 4 GiB answer), make a walk; it is followed through Get()
//   and through Lookup()+Record() alike, and its windows run to the export
//   end;
// * by a short answer (a window-limited upstream answered L < asked): a
//   later gap in the last window of that run fetches windows of L;
// * by a long request (beyond one window): the windows after the demand
//   one, up to the request end.
//
// Rules: at most Options::read_ahead_windows read-ahead fetches in flight
// per key (other keys and other callers are never queued behind them),
// kept within that many windows ahead of the scan's read position; windows
// skip what is cached or in flight, stop at the run's limit (export end, or
// the request end for long requests), and at most what half the memory
// bound holds is in flight, judged by the last window's answer size.
//
// Locks: methods named *Locked require the key's lock (exclusive unless
// noted). WalkStep() reads and writes only the key's walk atomics (races
// between readers can only make the heuristic less exact, never an answer
// wrong: read-ahead fetches are ordinary fetches).
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
  ReadAheadScheduler(uint32_t windows, uint64_t memory_limit_bytes,
                     uint64_t fetch_window_bytes)
      : windows_(windows),
        memory_limit_bytes_(memory_limit_bytes),
        fetch_window_(std::max<uint64_t>(
            1, std::min(fetch_window_bytes, kMaxNbdRequestLength))) {}

  uint64_t windows() const { return windows_; }

  // Whether a read of [from, request_end) continues the key's walk, without
  // changing it (the miss path asks before its answer is known).
  bool IsWalk(const KeyState& k, uint64_t from, uint64_t request_end,
              uint64_t export_size) const ABSL_SHARED_LOCKS_REQUIRED(k.mu);
  // A caller was handed [from, to) of a request [from, request_end)
  // (request_end and export_size 0 = unknown): advances the walk. Lock-free.
  struct Step {
    bool walk = false;  // the read continues a walk
    bool lock = false;  // OnHandOutLocked has work to do
  };
  Step WalkStep(KeyState& k, uint64_t from, uint64_t to, uint64_t request_end,
                uint64_t export_size) const;
  // With the lock, after WalkStep asked for it: counts read-ahead hits and
  // starts, follows or tops up the run.
  void OnHandOutLocked(KeyState& k, uint64_t from, uint64_t to, bool walk,
                       std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);

  // A caller registered its own fetch [gap, demand_end) for a request
  // [from, request_end). Starts (or continues) a run when the gap is in the
  // last window of a short-answered run, the request reaches beyond the
  // demand window, or the read continues a walk; windows to issue go to
  // *issue. Remembers the fetcher for walks seen only through Record().
  void PlanLocked(KeyState& k, uint64_t from, uint64_t gap, uint64_t demand_end,
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
    if (f.prefetch) --k.pf.inflight;
  }
  // Fetch f of k completed and was retired. ok: whether it answered;
  // answer_end / answer_extents: its answer, when ok (clipped, before any
  // poison cut). Learns the window of a short-answered demand fetch, and
  // keeps the run going after one of its windows.
  void OnCompleteLocked(KeyState& k, const Fetch& f, bool ok,
                        uint64_t answer_end, size_t answer_extents,
                        uint64_t export_size,
                        std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Memory one fill may insert: half the bound, shared with the key's
  // read-ahead windows in flight.
  uint64_t FillBudgetLocked(const KeyState& k) const
      ABSL_SHARED_LOCKS_REQUIRED(k.mu);
  // --- Whole-map prefetch: the same windows with the frontier at the
  // export end, started by the first detached Get() of a key whose export
  // has it on (KeyState::prefetch_parallel > 0), kept at that many fetches
  // in flight minus the callers' own fetches of the key in flight (it
  // yields to them), skipping what is cached or in flight. A window that
  // came back short or cut by a write is fetched again from where it
  // stopped; a failed one, or memory near the bound (`pressure`), ends the
  // prefetch (read-ahead by position still follows scans). While it runs,
  // walks start no read-ahead runs of their own.
  void MaybeStartPrefetchLocked(
      KeyState& k, uint64_t export_size,
      const std::shared_ptr<const AsyncFetcher>& fetcher, bool pressure,
      std::vector<FetchPtr>* issue) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  void TopUpPrefetchLocked(KeyState& k, bool pressure,
                           std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Prefetch fetch f completed (retired); ok/answer_end/answer_extents as
  // for OnCompleteLocked.
  void OnPrefetchDoneLocked(KeyState& k, const Fetch& f, bool ok,
                            uint64_t answer_end, size_t answer_extents,
                            bool pressure, std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // After the whole key was forgotten: a finished prefetch may start again
  // (one in flight runs on; its cut windows are fetched again).
  static void ResetPrefetchLocked(KeyState& k)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu) {
    if (k.pf.done) k.pf = PrefetchRun{};
  }
  // A running prefetch fetches [from, ...) again (a write cut a fetch that
  // was not the prefetch's own).
  static void RewindPrefetchLocked(KeyState& k, uint64_t from)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu) {
    if (k.pf.started && !k.pf.done) {
      k.pf.frontier = std::min(k.pf.frontier, from);
    }
  }
  static bool PrefetchActiveLocked(const KeyState& k)
      ABSL_SHARED_LOCKS_REQUIRED(k.mu) {
    return k.pf.started && !k.pf.done;
  }
  // Ends the key's run and forgets its fetchers (the export is removed).
  static void ForgetLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);

 private:
  // The window a walk of k reads ahead with: the learned short-answer
  // window, else the fetch window.
  uint64_t WalkWindow(const ReadAheadRun& ra) const {
    return ra.learned_window > 0 ? ra.learned_window : fetch_window_;
  }
  // Starts a run of `window`-byte windows from `from` to `limit`.
  void StartLocked(KeyState& k, uint64_t window, uint64_t from, uint64_t limit,
                   uint64_t read_pos, uint64_t export_size,
                   const std::shared_ptr<const AsyncFetcher>& fetcher,
                   std::vector<FetchPtr>* issue) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Ends a run: its unread windows are wasted.
  static void EndRunLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  static void UpdateLiveLocked(KeyState& k) ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);
  // Where knowledge (cached intervals, then fetches in flight) contiguous
  // from `pos` ends, looking no further than `to`; a fetch in flight counts
  // for at most `expect` bytes from its start.
  static uint64_t CoveredEndLocked(const KeyState& k, uint64_t pos, uint64_t to,
                                   uint64_t expect)
      ABSL_SHARED_LOCKS_REQUIRED(k.mu);
  static void EndPrefetchLocked(KeyState& k, bool completed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(k.mu);

  const uint64_t windows_;
  const uint64_t memory_limit_bytes_;
  const uint64_t fetch_window_;
};

}  // namespace cache_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_READ_AHEAD_H_
