// server/service/csi_service.h — the transport-free logic of the CSI
// services blockmeta serves: csi.v1.Identity and csi.v1.SnapshotMetadata
// (container-storage-interface/spec csi.proto), so the request rules are
// tested without a port. server/service/csi_grpc.cc is the thin gRPC layer.
//
// Snapshot ids (docs/api.md): a snapshot_id / target_snapshot_id resolves
// to the export whose ExportConfig.csi.snapshot_id equals it, else to the
// export of that name. A base_snapshot_id resolves, on the target export,
// through ExportConfig.csi.base_snapshot_bitmaps to a dirty bitmap NAME
// (context qemu:dirty-bitmap:NAME), else is taken as the bitmap NAME itself.
// The base snapshot never needs an export of its own.
//
// Request rules (csi.proto, "GetMetadataAllocated" / "GetMetadataDelta"
// errors): INVALID_ARGUMENT for a missing (empty) snapshot id or a negative
// starting_offset / max_results; NOT_FOUND for an unknown snapshot;
// FAILED_PRECONDITION when the target has no change tracking from the
// base; OUT_OF_RANGE for a starting_offset at or past the volume's end.
// max_results 0 means the server's choice (CsiServiceOptions).
//
// Stream invariant: within one stream, and across a resume that passes
// the end of the last range received as starting_offset, ranges are
// strictly increasing and never overlap (each starts at or after the
// previous end; the first ends after starting_offset).
//
// Thread-safety: CsiService's methods are thread-safe; one CsiStream is
// used by one step at a time (the stream skeleton runs its steps in order).
#ifndef BLOCKMETA_SERVER_SERVICE_CSI_SERVICE_H_
#define BLOCKMETA_SERVER_SERVICE_CSI_SERVICE_H_

#include <cstdint>
#include <deque>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "csi/v1/identity.pb.h"
#include "csi/v1/snapshot_metadata.pb.h"
#include "server/service/csi_ranges.h"
#include "server/service/extent_service.h"
#include "server/upstream/export_registry.h"

namespace blockmeta {

inline constexpr char kDefaultCsiDriverName[] = "blockmeta.csi.k8s.io";
inline constexpr char kDefaultCsiDriverVersion[] = "0.1.0";
// max_results above this are lowered to it.
inline constexpr uint32_t kCsiMaxResultsCap = 65536;

struct CsiServiceOptions {
  uint64_t fixed_block_size = 0;  // 0 = VARIABLE_LENGTH
  uint32_t default_max_results = 1024;
  std::string driver_name = kDefaultCsiDriverName;
  std::string driver_version = kDefaultCsiDriverVersion;
};

// The file path of a CSI driver socket address: "unix:///csi/csi.sock"
// (the CSI spec's CSI_ENDPOINT form), "unix:/csi/csi.sock" or a plain
// absolute path. INVALID_ARGUMENT for anything else (a TCP address, a
// relative path).
absl::StatusOr<std::string> CsiSocketPath(const std::string& address);

// One GetMetadataAllocated / GetMetadataDelta stream between messages.
struct CsiStream {
  ExtentService::Cursor cursor;
  std::optional<CsiRangeBuilder> builder;
  uint64_t capacity = 0;
  uint32_t max_results = 0;
  csi::v1::BlockMetadataType type = csi::v1::UNKNOWN;
  bool source_done = false;

  const std::string& export_name() const {
    return cursor.query.key.export_name;
  }
};

// One message's worth of ranges.
struct CsiChunk {
  std::deque<CsiRange> ranges;
  bool done = false;  // nothing follows this chunk
};

class CsiService {
 public:
  CsiService(const ExportRegistry* registry, ExtentService* extents,
             CsiServiceOptions options);
  CsiService(const CsiService&) = delete;
  CsiService& operator=(const CsiService&) = delete;

  // csi.v1.Identity. All cheap; never wait for an upstream.
  csi::v1::GetPluginInfoResponse GetPluginInfo() const;
  csi::v1::GetPluginCapabilitiesResponse GetPluginCapabilities() const;
  // Ready when every export's upstream is connected (vacuously with none:
  // the driver itself works, and exports may be registered at run time).
  csi::v1::ProbeResponse Probe() const;

  // Validate a request and open its stream (cheap; no upstream I/O).
  absl::StatusOr<CsiStream> PrepareAllocated(
      const csi::v1::GetMetadataAllocatedRequest& request) const;
  absl::StatusOr<CsiStream> PrepareDelta(
      const csi::v1::GetMetadataDeltaRequest& request) const;
  // The next message: up to max_results ranges, fewer only at the end.
  // Blocks on the upstream when the cache does not know: run it on the
  // export's worker pool.
  absl::StatusOr<CsiChunk> Next(CsiStream* stream, absl::Time deadline);

  // The export a snapshot id names (see the header comment). `field` names
  // the request field in error messages.
  absl::StatusOr<ExportRef> ResolveSnapshot(const std::string& id,
                                            const char* field) const;
  // The dirty-bitmap context base_snapshot_id names on `target`.
  static std::string BaseContext(const ExportEntry& target,
                                 const std::string& base_snapshot_id);

 private:
  absl::StatusOr<CsiStream> Open(const ExportEntry& entry,
                                 const std::string& context,
                                 CsiRangeBuilder::Select select,
                                 int64_t starting_offset, int32_t max_results,
                                 const std::string& missing_context_hint) const;

  // Constant after construction.
  const ExportRegistry* const registry_;
  ExtentService* const extents_;
  const CsiServiceOptions options_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_CSI_SERVICE_H_
