// server/service/block_meta_grpc.cc — see block_meta_grpc.h.
#include "server/service/block_meta_grpc.h"

#include <memory>
#include <utility>

#include "server/service/grpc_status.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

// Finishes a cheap call inline without an admission ticket: listing and
// stats must answer even when every export is busy.
template <typename Fn>
grpc::ServerUnaryReactor* FinishCheap(grpc::CallbackServerContext* context,
                                      Fn&& fn) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(fn()));
  return reactor;
}

// Finishes a unary call whose answer is computed cheaply, inline.
template <typename Fn>
grpc::ServerUnaryReactor* FinishInline(grpc::CallbackServerContext* context,
                                       Admission* admission, Fn&& fn) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Admission::Ticket ticket = admission->TryAcquire();
  if (!ticket) {
    reactor->Finish(OverloadedStatus(*admission));
    return reactor;
  }
  reactor->Finish(ToGrpcStatus(fn()));
  return reactor;
}

// Streams MapExtents batches; each batch is produced on the worker pool.
class MapReactor final
    : public grpc::ServerWriteReactor<v1::MapExtentsResponse> {
 public:
  MapReactor(const CallContext& ctx, grpc::CallbackServerContext* context,
             const v1::MapExtentsRequest& request)
      : ctx_(ctx),
        deadline_(CallDeadline(context, ctx.default_deadline)),
        ticket_(ctx.admission->TryAcquire(request.export_name())) {
    if (!ticket_) {
      Finish(OverloadedStatus(*ctx.admission));
      return;
    }
    absl::StatusOr<ExtentService::Cursor> cursor =
        ctx_.service->PrepareMap(request);
    if (!cursor.ok()) {
      Finish(ToGrpcStatus(cursor.status()));
      return;
    }
    cursor_ = *std::move(cursor);
    ProduceNext();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                          "client went away during the stream"));
      return;
    }
    if (done_) {
      Finish(grpc::Status::OK);
      return;
    }
    ProduceNext();
  }

  void OnCancel() override { cancelled_.store(true); }

  void OnDone() override { delete this; }

 private:
  void ProduceNext() {
    ctx_.pools->Schedule(cursor_.query.key.export_name, [this] {
      if (cancelled_.load()) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled"));
        return;
      }
      absl::StatusOr<ExtentService::Batch> batch =
          ctx_.service->NextBatch(&cursor_, deadline_);
      if (!batch.ok()) {
        Finish(ToGrpcStatus(batch.status()));
        return;
      }
      response_.Clear();
      response_.mutable_extents()->Reserve(
          static_cast<int>(batch->extents.size()));
      for (const Extent& e : batch->extents) {
        ToProto(e, cursor_.query.key.context, response_.add_extents());
      }
      response_.set_next_offset(batch->next_offset);
      response_.set_export_size(cursor_.query.export_size);
      response_.set_context(cursor_.query.key.context);
      done_ = batch->done;
      // Every stream carries at least one message (export_size), even for
      // an empty export; after that an empty final batch just ends it.
      if (batch->extents.empty() && done_ && sent_any_) {
        Finish(grpc::Status::OK);
        return;
      }
      sent_any_ = true;
      StartWrite(&response_);
    });
  }

  const CallContext ctx_;
  const absl::Time deadline_;
  Admission::Ticket ticket_;
  // Touched only by the one step in progress (a pool task or OnWriteDone);
  // steps are sequential, so no lock is needed.
  ExtentService::Cursor cursor_;
  v1::MapExtentsResponse response_;
  bool done_ = false;
  bool sent_any_ = false;
  std::atomic<bool> cancelled_{false};
};

}  // namespace

grpc::ServerUnaryReactor* BlockMetaGrpcService::ListExports(
    grpc::CallbackServerContext* context, const v1::ListExportsRequest*,
    v1::ListExportsResponse* response) {
  return FinishCheap(context, [&]() -> absl::Status {
    absl::StatusOr<v1::ListExportsResponse> r = ctx_.service->ListExports();
    if (!r.ok()) return r.status();
    *response = *std::move(r);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockMetaGrpcService::GetExportInfo(
    grpc::CallbackServerContext* context,
    const v1::GetExportInfoRequest* request, v1::ExportInfo* response) {
  return FinishCheap(context, [&]() -> absl::Status {
    absl::StatusOr<v1::ExportInfo> r = ctx_.service->GetExportInfo(*request);
    if (!r.ok()) return r.status();
    *response = *std::move(r);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockMetaGrpcService::GetExtents(
    grpc::CallbackServerContext* context, const v1::GetExtentsRequest* request,
    v1::GetExtentsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Admission::Ticket ticket = ctx_.admission->TryAcquire(request->export_name());
  if (!ticket) {
    reactor->Finish(OverloadedStatus(*ctx_.admission));
    return reactor;
  }
  absl::StatusOr<ExtentService::Query> query =
      ctx_.service->PrepareExtents(*request);
  if (!query.ok()) {
    reactor->Finish(ToGrpcStatus(query.status()));
    return reactor;
  }
  // Fast path: a cache hit is answered on this thread, no hop.
  if (std::optional<v1::GetExtentsResponse> hit =
          ctx_.service->TryAnswerFromCache(*query)) {
    *response = *std::move(hit);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
  absl::Time deadline = CallDeadline(context, ctx_.default_deadline);
  const std::string export_name = query->key.export_name;
  ctx_.pools->Schedule(
      export_name, [this, context, reactor, response, query = *std::move(query),
                    deadline, ticket = std::move(ticket)]() mutable {
        if (context->IsCancelled()) {
          reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                                       "call cancelled before it was served"));
          return;
        }
        absl::StatusOr<v1::GetExtentsResponse> r =
            ctx_.service->Answer(query, deadline);
        ticket.Release();
        if (!r.ok()) {
          reactor->Finish(ToGrpcStatus(r.status()));
          return;
        }
        *response = *std::move(r);
        reactor->Finish(grpc::Status::OK);
      });
  return reactor;
}

grpc::ServerWriteReactor<v1::MapExtentsResponse>*
BlockMetaGrpcService::MapExtents(grpc::CallbackServerContext* context,
                                 const v1::MapExtentsRequest* request) {
  return new MapReactor(ctx_, context, *request);
}

grpc::ServerUnaryReactor* BlockMetaGrpcService::InvalidateCache(
    grpc::CallbackServerContext* context,
    const v1::InvalidateCacheRequest* request,
    v1::InvalidateCacheResponse* response) {
  return FinishInline(context, ctx_.admission, [&]() -> absl::Status {
    absl::StatusOr<v1::InvalidateCacheResponse> r =
        ctx_.service->InvalidateCache(*request);
    if (!r.ok()) return r.status();
    *response = *std::move(r);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockMetaGrpcService::GetStats(
    grpc::CallbackServerContext* context, const v1::GetStatsRequest* request,
    v1::GetStatsResponse* response) {
  return FinishCheap(context, [&]() -> absl::Status {
    absl::StatusOr<v1::GetStatsResponse> r = ctx_.service->GetStats(*request);
    if (!r.ok()) return r.status();
    *response = *std::move(r);
    return absl::OkStatus();
  });
}

}  // namespace blockmeta
