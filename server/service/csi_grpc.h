// server/service/csi_grpc.h — the CSI SnapshotMetadata service (csi.v1)
// on blockmeta's cache, so Kubernetes' external-snapshot-metadata sidecar
// can use blockmeta as its backend.
//
// Mapping (docs/api.md): snapshot_id / target_snapshot_id name an export;
// base_snapshot_id names a dirty bitmap (checkpoint) of that export, read
// through the qemu:dirty-bitmap:BASE context. A delta without that bitmap
// is FAILED_PRECONDITION ("perform a full backup instead").
//
// Stream rules kept: max_results caps entries per message (0 = server's
// choice); ranges strictly increase across messages; the first range ends
// after starting_offset; block_metadata_type and volume_capacity_bytes are
// constant within a stream; a clean end of stream means complete; errors
// end the stream with a status and the caller resumes from its last offset.
#ifndef BLOCKMETA_SERVER_SERVICE_CSI_GRPC_H_
#define BLOCKMETA_SERVER_SERVICE_CSI_GRPC_H_

#include <cstdint>

#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "server/service/call_context.h"

namespace blockmeta {

struct CsiOptions {
  uint64_t fixed_block_size = 0;  // 0 = VARIABLE_LENGTH
  uint32_t default_max_results = 1024;
};

class CsiSnapshotMetadataService final
    : public csi::v1::SnapshotMetadata::CallbackService {
 public:
  CsiSnapshotMetadataService(CallContext ctx, CsiOptions options)
      : ctx_(ctx), options_(options) {}

  grpc::ServerWriteReactor<csi::v1::GetMetadataAllocatedResponse>*
  GetMetadataAllocated(
      grpc::CallbackServerContext* context,
      const csi::v1::GetMetadataAllocatedRequest* request) override;
  grpc::ServerWriteReactor<csi::v1::GetMetadataDeltaResponse>* GetMetadataDelta(
      grpc::CallbackServerContext* context,
      const csi::v1::GetMetadataDeltaRequest* request) override;

 private:
  const CallContext ctx_;
  const CsiOptions options_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_CSI_GRPC_H_
