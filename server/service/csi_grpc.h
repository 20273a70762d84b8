// server/service/csi_grpc.h — the CSI services on blockmeta's cache, so
// Kubernetes' external-snapshot-metadata sidecar can use blockmeta as its
// backend: csi.v1.Identity (which the sidecar calls first) and
// csi.v1.SnapshotMetadata. Both are thin gRPC layers over CsiService
// (csi_service.h), which holds the request rules and the snapshot-id
// mapping (docs/api.md).
//
// Identity calls are answered inline and take no admission ticket: the
// sidecar exits on any error from them, so an overloaded server must still
// answer its Probe. SnapshotMetadata streams run on the shared stream
// skeleton (batch_stream.h): messages are filled on the export's worker
// pool, and a clean end of stream means complete.
#ifndef BLOCKMETA_SERVER_SERVICE_CSI_GRPC_H_
#define BLOCKMETA_SERVER_SERVICE_CSI_GRPC_H_

#include "csi/v1/identity.grpc.pb.h"
#include "csi/v1/snapshot_metadata.grpc.pb.h"
#include "server/service/call_context.h"
#include "server/service/csi_service.h"

namespace blockmeta {

class CsiIdentityService final : public csi::v1::Identity::CallbackService {
 public:
  explicit CsiIdentityService(const CsiService* csi) : csi_(csi) {}

  grpc::ServerUnaryReactor* GetPluginInfo(
      grpc::CallbackServerContext* context,
      const csi::v1::GetPluginInfoRequest* request,
      csi::v1::GetPluginInfoResponse* response) override;
  grpc::ServerUnaryReactor* GetPluginCapabilities(
      grpc::CallbackServerContext* context,
      const csi::v1::GetPluginCapabilitiesRequest* request,
      csi::v1::GetPluginCapabilitiesResponse* response) override;
  grpc::ServerUnaryReactor* Probe(grpc::CallbackServerContext* context,
                                  const csi::v1::ProbeRequest* request,
                                  csi::v1::ProbeResponse* response) override;

 private:
  const CsiService* const csi_;
};

class CsiSnapshotMetadataService final
    : public csi::v1::SnapshotMetadata::CallbackService {
 public:
  CsiSnapshotMetadataService(CallContext ctx, CsiService* csi)
      : ctx_(ctx), csi_(csi) {}

  grpc::ServerWriteReactor<csi::v1::GetMetadataAllocatedResponse>*
  GetMetadataAllocated(
      grpc::CallbackServerContext* context,
      const csi::v1::GetMetadataAllocatedRequest* request) override;
  grpc::ServerWriteReactor<csi::v1::GetMetadataDeltaResponse>* GetMetadataDelta(
      grpc::CallbackServerContext* context,
      const csi::v1::GetMetadataDeltaRequest* request) override;

 private:
  const CallContext ctx_;
  CsiService* const csi_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_CSI_GRPC_H_
