// server/service/totals.h — BlockMeta.GetTotals, transport-free: how many
// bytes of a range are data, hole, zero, dirty, dirty-and-data, ... per
// metadata context, without sending the extents.
//
// The range is walked exactly as a multi-context MapExtents walks it
// (multi_context.h): each context is its own ExtentService::Cursor on its
// own cache key, so the cached part comes from the cache and the gaps from
// the export's fetcher through ExtentCache::Get (single-flight, read-ahead,
// detached waits), and what is fetched stays cached. With several
// contexts ContextMerge splits them at the union of their boundaries (one
// context skips the merge and reads its cursor's batches directly);
// TotalsAccumulator adds each piece's length to the sums its flags select.
//
// Definitions (blockmeta.proto ContextTotals; docs/api.md "Totals"):
//   base:allocation  data = HOLE clear, hole = HOLE set,
//                    zero = ZERO set, nonzero = ZERO clear;
//   dirty bitmap     dirty = DIRTY set, clean = DIRTY clear; with
//                    base:allocation in the same request also
//                    dirty_data = DIRTY and HOLE clear,
//                    dirty_nonzero = DIRTY and ZERO clear;
//   any context      extents (runs of equal flags), by_flags.
// Only flags the upstream reported are counted (the walk never guesses a
// flag), so no byte is counted hole, zero or clean that the upstream did
// not say was.
//
// Cost: time linear in the merged extents of the range; memory at most one
// batch per context plus up to kMaxFlagValues histogram entries per
// context, never a map. A step (TotalsStep) handles one batch (at most
// kTotalsBatchExtents per context) and stops waiting for the upstream at
// its slice end, so a caller can yield between steps (the gRPC layer
// reschedules each step on the export's worker lane and checks
// cancellation and the deadline).
//
// Thread-safety: a TotalsCursor is used by one step at a time; the
// functions are otherwise as thread-safe as ExtentService.
#ifndef BLOCKMETA_SERVER_SERVICE_TOTALS_H_
#define BLOCKMETA_SERVER_SERVICE_TOTALS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "blockmeta/v1/blockmeta.pb.h"
#include "server/service/context_merge.h"
#include "server/service/extent_service.h"
#include "server/service/multi_context.h"

namespace blockmeta {

// Extents per step and context (a batch of ExtentService::NextBatch).
inline constexpr uint32_t kTotalsBatchExtents = 4096;

// Distinct raw flags values listed per context (by_flags); more are
// counted in the named totals only (by_flags_truncated).
inline constexpr size_t kMaxFlagValues = 64;

// Sums over merged extents fed in increasing, contiguous order.
class TotalsAccumulator {
 public:
  // `contexts`: the names, defaults filled in, in merged-flags order.
  explicit TotalsAccumulator(std::vector<std::string> contexts);

  // `length` bytes over which context i's flags are flags[i] (one entry
  // per context).
  void Add(uint64_t length, absl::Span<const uint32_t> flags);

  // Merged extents added (after coalescing by the caller).
  uint64_t merged_extents() const { return merged_extents_; }
  // Fills response->contexts (one per context, in order).
  void Fill(blockmeta::v1::GetTotalsResponse* response) const;

 private:
  enum class Kind { kAllocation, kDirtyBitmap, kOther };
  struct Sums {
    std::string context;
    Kind kind = Kind::kOther;
    uint64_t extents = 0;
    bool have_last = false;
    uint32_t last_flags = 0;
    uint64_t data = 0, hole = 0, zero = 0, nonzero = 0;
    uint64_t dirty = 0, clean = 0, dirty_data = 0, dirty_nonzero = 0;
    // (flags, bytes), unsorted, at most kMaxFlagValues entries; searched
    // linearly (there are 2 to 4 in practice).
    absl::InlinedVector<std::pair<uint32_t, uint64_t>, 4> by_flags;
    bool by_flags_truncated = false;
  };

  std::vector<Sums> sums_;
  // Index of base:allocation in sums_, or -1 when not asked.
  int allocation_ = -1;
  uint64_t merged_extents_ = 0;
};

// One context is walked with its ExtentService cursor alone
// (walk.inputs[0]); several through walk's ContextMerge (which costs about
// as much CPU as the rest of a warm walk, so one context skips it).
struct TotalsCursor {
  MultiCursor walk;
  TotalsAccumulator sums;
  uint64_t start = 0;  // the range: [start, walk.end)

  const std::string& export_name() const { return walk.export_name(); }
  // Where the totalled part ends.
  uint64_t position() const {
    return walk.inputs.size() == 1 ? walk.inputs.front().query.offset
                                   : walk.merge->known_end();
  }
};

// Validates (cheap, no upstream I/O): NOT_FOUND unknown export;
// INVALID_ARGUMENT more than kMaxMergedContexts contexts, a repeat, a
// malformed name, an unknown cache_mode, offset + length overflowing;
// OUT_OF_RANGE offset at or past the end (except offset 0 of an empty
// export); FAILED_PRECONDITION a context the export does not offer;
// UNAVAILABLE the export is not connected.
absl::StatusOr<TotalsCursor> PrepareTotals(
    const ExtentService& service, const blockmeta::v1::GetTotalsRequest& r);

// Totals the next merged batch (up to the service's batch cap). Blocks on
// the upstream for what the cache does not know: run on the export's
// worker pool. Returns true once the whole range is totalled, false when
// there is more (call again). The step returns by `slice_end` too when it
// waits for a fetch (except with CACHE_MODE_BYPASS): the fetch runs on,
// detached, and the next step picks its answer up, so a caller can check
// for cancellation and yield its thread between slices. Errors are final
// (the totals of part of a range are never returned); DEADLINE_EXCEEDED
// once `deadline` passes says how far the walk got.
absl::StatusOr<bool> TotalsStep(ExtentService* service, TotalsCursor* cursor,
                                absl::Time deadline, absl::Time slice_end);

// The answer once TotalsStep returned true.
blockmeta::v1::GetTotalsResponse TotalsResponse(const TotalsCursor& cursor);

// Steps to the end (for callers that may block, and tests). Fails with
// DEADLINE_EXCEEDED, saying how far it got, when `deadline` passes first.
absl::StatusOr<blockmeta::v1::GetTotalsResponse> ComputeTotals(
    ExtentService* service, TotalsCursor* cursor, absl::Time deadline);

// The DEADLINE_EXCEEDED status of a walk stopped at its position.
absl::Status TotalsDeadlineStatus(const TotalsCursor& cursor);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_TOTALS_H_
