// server/service/block_meta_grpc.h — the blockmeta.v1.BlockMeta gRPC
// service: a thin callback-API layer over ExtentService.
//
// Never blocks a gRPC callback thread: cache hits are answered inline;
// anything that may wait for an upstream runs on the shared WorkerPools
// (capped per export) and finishes the reactor from there. GetTotals walks
// its range there one slice per task (a slice stops waiting for the
// upstream after a second; the fetch runs on), each rescheduled behind the
// export's other work, with cancellation and the deadline checked between
// slices. GetExtents, MapExtents and GetTotals take an admission ticket for
// their export (RESOURCE_EXHAUSTED when the global or the per-export cap is
// reached), InvalidateCache a global one; ListExports, GetExportInfo and
// GetStats take none, so they answer however busy the exports are. Calls
// honour the client's deadline down to the upstream call.
#ifndef BLOCKMETA_SERVER_SERVICE_BLOCK_META_GRPC_H_
#define BLOCKMETA_SERVER_SERVICE_BLOCK_META_GRPC_H_

#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "server/service/call_context.h"

namespace blockmeta {

class BlockMetaGrpcService final
    : public blockmeta::v1::BlockMeta::CallbackService {
 public:
  explicit BlockMetaGrpcService(CallContext ctx) : ctx_(ctx) {}

  grpc::ServerUnaryReactor* ListExports(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::ListExportsRequest* request,
      blockmeta::v1::ListExportsResponse* response) override;
  grpc::ServerUnaryReactor* GetExportInfo(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::GetExportInfoRequest* request,
      blockmeta::v1::ExportInfo* response) override;
  grpc::ServerUnaryReactor* GetExtents(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::GetExtentsRequest* request,
      blockmeta::v1::GetExtentsResponse* response) override;
  grpc::ServerWriteReactor<blockmeta::v1::MapExtentsResponse>* MapExtents(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::MapExtentsRequest* request) override;
  grpc::ServerUnaryReactor* InvalidateCache(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::InvalidateCacheRequest* request,
      blockmeta::v1::InvalidateCacheResponse* response) override;
  grpc::ServerUnaryReactor* GetTotals(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::GetTotalsRequest* request,
      blockmeta::v1::GetTotalsResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(
      grpc::CallbackServerContext* context,
      const blockmeta::v1::GetStatsRequest* request,
      blockmeta::v1::GetStatsResponse* response) override;

 private:
  const CallContext ctx_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_BLOCK_META_GRPC_H_
