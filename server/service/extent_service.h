// server/service/extent_service.h — the transport-free logic behind the
// blockmeta.v1.BlockMeta and csi.v1.SnapshotMetadata gRPC services.
//
// ExtentService validates requests, turns them into queries on the shared
// ExtentCache (or, for CACHE_MODE_BYPASS, directly on the Upstream), and
// builds reply messages. It knows nothing of gRPC: every method returns
// absl::Status(Or); the gRPC layers (block_meta_grpc.cc, csi_grpc.cc)
// convert to grpc::Status with ToGrpcStatus (grpc_status.h). Multi-context
// queries are built on the one-context streams here by multi_context.h.
//
// Two kinds of methods:
// * Cheap ones that never wait for an upstream (ListExports, GetExportInfo,
//   Prepare*, TryAnswerFromCache, InvalidateCache, GetStats): safe on a gRPC
//   callback thread.
// * Blocking ones (Answer, NextBatch) that may call the upstream: run them
//   on the WorkerPool, never on a callback thread.
//
// Correctness rule (docs/architecture.md): a reply never claims a hole,
// zero or clean range that the upstream did not report; replies are
// contiguous from the requested offset and never extend past the request.
//
// Lifetimes: exports are looked up in the registry per call (they come and
// go at run time). A Query holds a reference to the entry it found, so the
// entry and its upstream outlive the call. The fetchers handed to the cache
// outlive the call (read-ahead, detached fetches): they hold a weak
// reference to the upstream, locked per fetch, and the export's state, and
// fail with NOT_FOUND once the export was removed. Removing an export
// closes its upstream (ExportRegistry::Remove), so a call or stream
// waiting on it ends at once with NOT_FOUND "was removed" (RemovedError).
//
// Thread-safety: all methods are thread-safe. Counters are atomics in the
// entry (they die with its generation).
#ifndef BLOCKMETA_SERVER_SERVICE_EXTENT_SERVICE_H_
#define BLOCKMETA_SERVER_SERVICE_EXTENT_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockmeta/v1/blockmeta.pb.h"
#include "server/cache/extent_cache.h"
#include "server/upstream/export_registry.h"

namespace blockmeta {

// Called after every upstream block-status call made for the service.
using UpstreamCallObserver =
    std::function<void(const std::string& export_name, absl::Duration latency,
                       const absl::Status& status)>;

class ExtentService {
 public:
  struct Options {
    uint32_t default_max_extents = 1024;
    uint32_t max_extents_cap = 65536;
    UpstreamCallObserver on_upstream_call;  // optional
    // Fills GetStatsResponse's store fields (path, bytes, bound); optional
    // (no store).
    std::function<void(blockmeta::v1::GetStatsResponse*)> fill_store_stats;
  };

  // A validated extents query. Holds no locks; holds the export's entry
  // (a reference), so it stays valid if the export is removed meanwhile.
  struct Query {
    ExportRef entry;
    CacheKey key;
    uint64_t export_size = 0;
    uint64_t offset = 0;
    uint64_t end = 0;  // exclusive, clipped to export_size
    uint32_t max_extents = 0;
    blockmeta::v1::CacheMode cache_mode = blockmeta::v1::CACHE_MODE_USE;
  };

  // The state of one MapExtents (or CSI) stream between batches.
  struct Cursor {
    Query query;  // query.offset advances as batches are produced
    bool coalesce = true;
    bool refreshed = false;  // CACHE_MODE_REFRESH invalidation done
  };

  struct Batch {
    ExtentList extents;  // contiguous from the cursor's previous offset
    uint64_t next_offset = 0;
    bool done = false;                // the range is complete
    Outcome outcome = Outcome::kHit;  // where the extents came from
  };

  ExtentService(const ExportRegistry* registry, ExtentCache* cache,
                Options options);
  ExtentService(const ExtentService&) = delete;
  ExtentService& operator=(const ExtentService&) = delete;

  absl::StatusOr<blockmeta::v1::ListExportsResponse> ListExports() const;
  absl::StatusOr<blockmeta::v1::ExportInfo> GetExportInfo(
      const blockmeta::v1::GetExportInfoRequest& request) const;

  // Validates a GetExtents request (cheap; no upstream I/O).
  absl::StatusOr<Query> PrepareExtents(
      const blockmeta::v1::GetExtentsRequest& request) const;
  // Answers from the cache alone when it knows the whole answer (the range
  // or max_extents); nullopt otherwise. Never waits.
  std::optional<blockmeta::v1::GetExtentsResponse> TryAnswerFromCache(
      const Query& query);
  // Answers, asking the upstream for what the cache does not know. Blocks.
  absl::StatusOr<blockmeta::v1::GetExtentsResponse> Answer(const Query& query,
                                                           absl::Time deadline);

  // Validates a MapExtents request.
  absl::StatusOr<Cursor> PrepareMap(
      const blockmeta::v1::MapExtentsRequest& request) const;
  // Validates a stream over an export / context given by name (the CSI
  // service uses it). length 0 = to the end.
  absl::StatusOr<Cursor> PrepareStream(const std::string& export_name,
                                       const std::string& context,
                                       uint64_t offset, uint64_t length,
                                       uint32_t batch_size) const;
  // The next batch of up to cursor->query.max_extents extents. Blocks when
  // the cache does not know them. Advances the cursor.
  absl::StatusOr<Batch> NextBatch(Cursor* cursor, absl::Time deadline);

  absl::StatusOr<blockmeta::v1::InvalidateCacheResponse> InvalidateCache(
      const blockmeta::v1::InvalidateCacheRequest& request);
  absl::StatusOr<blockmeta::v1::GetStatsResponse> GetStats(
      const blockmeta::v1::GetStatsRequest& request) const;

  // Looks up an export; NOT_FOUND (with the known names) when unknown.
  absl::StatusOr<ExportRef> FindExport(const std::string& name) const;
  // Every export for "", else the one named (NOT_FOUND when unknown).
  absl::StatusOr<std::vector<ExportRef>> ExportsNamed(
      const std::string& name) const;

 private:
  // Collects extents of [offset, end) up to max_extents, from the cache
  // (mode USE) or the upstream (mode BYPASS). Stops early at the deadline
  // or an error once at least one extent is known.
  absl::StatusOr<LookupResult> Collect(const Query& query, uint64_t offset,
                                       size_t max_extents, bool coalesce,
                                       absl::Time deadline);
  // One upstream answer from `pos` for CACHE_MODE_BYPASS, clipped to the
  // query's end and to `want` extents (0 = all).
  absl::StatusOr<LookupResult> BypassStep(const Query& query, uint64_t pos,
                                          size_t want, absl::Time deadline);
  // The cache's fetcher for the query's export and context.
  AsyncFetcher MakeFetcher(const Query& query) const;
  absl::StatusOr<ExtentList> FetchFromUpstream(const Query& query,
                                               uint64_t offset, uint64_t length,
                                               absl::Time deadline);
  absl::StatusOr<Query> Validate(const std::string& export_name,
                                 const std::string& context, uint64_t offset,
                                 uint64_t length, bool length_zero_means_end,
                                 uint32_t max_extents,
                                 blockmeta::v1::CacheMode mode) const;
  blockmeta::v1::GetExtentsResponse MakeResponse(const Query& query,
                                                 const LookupResult& r) const;

  // Constant after construction.
  const ExportRegistry* const registry_;
  ExtentCache* const cache_;
  const Options options_;
};

// NOT_FOUND: `export_name` was removed while a call or stream used it.
absl::Status RemovedError(const std::string& export_name);

// Fills a v1::Extent from a cached one for `context`.
void ToProto(const Extent& e, const std::string& context,
             blockmeta::v1::Extent* out);

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_EXTENT_SERVICE_H_
