// server/service/multi_context.h — GetExtents and MapExtents over several
// metadata contexts of one export at once (GetExtentsRequest.contexts,
// MapExtentsRequest.contexts), e.g. base:allocation with
// qemu:dirty-bitmap:NAME for "changed, and does it read as zeroes".
//
// Each context runs as its own one-context stream (ExtentService::Cursor):
// it is validated, cached and fetched on its own cache key exactly as a
// one-context query would be. ContextMerge splits the streams at the union
// of their boundaries. Only the lagging context is asked for its next
// batch, so a stream holds at most one batch per context, never a map.
//
// Validation: `context` and `contexts` are exclusive; at most
// kMaxMergedContexts contexts, no repeats ("" = base:allocation); each is
// then validated as a one-context request (NOT_FOUND, OUT_OF_RANGE,
// FAILED_PRECONDITION, ... with the context named).
//
// Thread-safety: as ExtentService; one MultiCursor is used by one step at
// a time.
#ifndef BLOCKMETA_SERVER_SERVICE_MULTI_CONTEXT_H_
#define BLOCKMETA_SERVER_SERVICE_MULTI_CONTEXT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockmeta/v1/blockmeta.pb.h"
#include "server/service/context_merge.h"
#include "server/service/extent_service.h"

namespace blockmeta {

inline constexpr size_t kMaxMergedContexts = 8;

struct MultiCursor {
  std::vector<ExtentService::Cursor> inputs;  // one per context
  std::vector<bool> input_done;
  std::vector<std::string> contexts;  // names, defaults filled in
  std::unique_ptr<ContextMerge> merge;
  uint64_t offset = 0;  // the merged stream's position
  uint64_t end = 0;
  uint64_t export_size = 0;
  uint32_t max_extents = 0;  // merged extents per batch / answer
  bool used_cache = false, used_upstream = false, bypass = false;

  const std::string& export_name() const {
    return inputs.front().query.key.export_name;
  }
};

struct MergedBatch {
  std::vector<MergedExtent> extents;  // contiguous from the previous offset
  uint64_t next_offset = 0;
  bool done = false;
};

// Validate (cheap, no upstream I/O).
absl::StatusOr<MultiCursor> PrepareMultiExtents(
    const ExtentService& service, const blockmeta::v1::GetExtentsRequest& r);
absl::StatusOr<MultiCursor> PrepareMultiMap(
    const ExtentService& service, const blockmeta::v1::MapExtentsRequest& r);

// Up to cursor->max_extents merged extents. Blocks on the upstream for
// what the cache does not know: run on the export's worker pool. An error
// after some extents are known returns those; the next call reports it.
absl::StatusOr<MergedBatch> NextMerged(ExtentService* service,
                                       MultiCursor* cursor,
                                       absl::Time deadline);
// One GetExtents answer (one merged batch). Blocks.
absl::StatusOr<blockmeta::v1::GetExtentsResponse> AnswerMulti(
    ExtentService* service, MultiCursor* cursor, absl::Time deadline);

// Fills a v1::Extent: Extent.contexts per context and the summary fields
// (see blockmeta.proto).
void MergedToProto(const MergedExtent& e,
                   const std::vector<std::string>& contexts,
                   blockmeta::v1::Extent* out);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_MULTI_CONTEXT_H_
