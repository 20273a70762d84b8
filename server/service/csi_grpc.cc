// server/service/csi_grpc.cc — see csi_grpc.h.
#include "server/service/csi_grpc.h"

#include <utility>

#include "server/service/batch_stream.h"

namespace blockmeta {
namespace {

// Both SnapshotMetadata streams; Resp is GetMetadataAllocatedResponse or
// GetMetadataDeltaResponse (the same fields and numbers).
template <typename Resp>
class CsiSource {
 public:
  using Response = Resp;

  CsiSource(CsiService* csi, CsiStream stream)
      : csi_(csi), stream_(std::move(stream)) {}

  const std::string& export_name() const { return stream_.export_name(); }

  absl::StatusOr<StreamStep> Fill(Response* out, absl::Time deadline) {
    absl::StatusOr<CsiChunk> chunk = csi_->Next(&stream_, deadline);
    if (!chunk.ok()) return chunk.status();
    out->set_block_metadata_type(stream_.type);
    out->set_volume_capacity_bytes(static_cast<int64_t>(stream_.capacity));
    out->mutable_block_metadata()->Reserve(
        static_cast<int>(chunk->ranges.size()));
    for (const CsiRange& r : chunk->ranges) {
      csi::v1::BlockMetadata* m = out->add_block_metadata();
      m->set_byte_offset(static_cast<int64_t>(r.offset));
      m->set_size_bytes(static_cast<int64_t>(r.length));
    }
    return StreamStep{chunk->ranges.empty(), chunk->done};
  }

 private:
  CsiService* csi_;
  CsiStream stream_;
};

template <typename Response, typename Fn>
grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* context,
                                 Response* response, Fn&& fn) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  *response = fn();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace

grpc::ServerUnaryReactor* CsiIdentityService::GetPluginInfo(
    grpc::CallbackServerContext* context, const csi::v1::GetPluginInfoRequest*,
    csi::v1::GetPluginInfoResponse* response) {
  return Answer(context, response, [this] { return csi_->GetPluginInfo(); });
}

grpc::ServerUnaryReactor* CsiIdentityService::GetPluginCapabilities(
    grpc::CallbackServerContext* context,
    const csi::v1::GetPluginCapabilitiesRequest*,
    csi::v1::GetPluginCapabilitiesResponse* response) {
  return Answer(context, response,
                [this] { return csi_->GetPluginCapabilities(); });
}

grpc::ServerUnaryReactor* CsiIdentityService::Probe(
    grpc::CallbackServerContext* context, const csi::v1::ProbeRequest*,
    csi::v1::ProbeResponse* response) {
  return Answer(context, response, [this] { return csi_->Probe(); });
}

grpc::ServerWriteReactor<csi::v1::GetMetadataAllocatedResponse>*
CsiSnapshotMetadataService::GetMetadataAllocated(
    grpc::CallbackServerContext* context,
    const csi::v1::GetMetadataAllocatedRequest* request) {
  using Source = CsiSource<csi::v1::GetMetadataAllocatedResponse>;
  CsiService* csi = csi_;
  return BatchStreamReactor<Source>::Start(
      ctx_, context, [csi, request]() -> absl::StatusOr<Source> {
        absl::StatusOr<CsiStream> s = csi->PrepareAllocated(*request);
        if (!s.ok()) return s.status();
        return Source(csi, *std::move(s));
      });
}

grpc::ServerWriteReactor<csi::v1::GetMetadataDeltaResponse>*
CsiSnapshotMetadataService::GetMetadataDelta(
    grpc::CallbackServerContext* context,
    const csi::v1::GetMetadataDeltaRequest* request) {
  using Source = CsiSource<csi::v1::GetMetadataDeltaResponse>;
  CsiService* csi = csi_;
  return BatchStreamReactor<Source>::Start(
      ctx_, context, [csi, request]() -> absl::StatusOr<Source> {
        absl::StatusOr<CsiStream> s = csi->PrepareDelta(*request);
        if (!s.ok()) return s.status();
        return Source(csi, *std::move(s));
      });
}

}  // namespace blockmeta
