// server/service/block_meta_grpc.cc — see block_meta_grpc.h.
#include "server/service/block_meta_grpc.h"

#include <memory>
#include <utility>

#include "server/service/batch_stream.h"
#include "server/service/grpc_status.h"
#include "server/service/multi_context.h"
#include "server/service/totals.h"
#include "server/service/unary_on_pool.h"

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

// The MapExtents stream: one message per batch of the cursor.
class MapSource {
 public:
  using Response = v1::MapExtentsResponse;

  MapSource(ExtentService* service, ExtentService::Cursor cursor)
      : service_(service), cursor_(std::move(cursor)) {}

  const std::string& export_name() const {
    return cursor_.query.key.export_name;
  }

  absl::StatusOr<StreamStep> Fill(Response* out, absl::Time deadline) {
    absl::StatusOr<ExtentService::Batch> batch =
        service_->NextBatch(&cursor_, deadline);
    if (!batch.ok()) return batch.status();
    out->mutable_extents()->Reserve(static_cast<int>(batch->extents.size()));
    for (const Extent& e : batch->extents) {
      ToProto(e, cursor_.query.key.context, out->add_extents());
    }
    out->set_next_offset(batch->next_offset);
    out->set_export_size(cursor_.query.export_size);
    out->set_context(cursor_.query.key.context);
    return StreamStep{batch->extents.empty(), batch->done};
  }

 private:
  ExtentService* service_;
  ExtentService::Cursor cursor_;
};

// The MapExtents stream over several contexts: one message per merged batch.
class MultiMapSource {
 public:
  using Response = v1::MapExtentsResponse;

  MultiMapSource(ExtentService* service, MultiCursor cursor)
      : service_(service), cursor_(std::move(cursor)) {}

  const std::string& export_name() const { return cursor_.export_name(); }

  absl::StatusOr<StreamStep> Fill(Response* out, absl::Time deadline) {
    absl::StatusOr<MergedBatch> batch =
        NextMerged(service_, &cursor_, deadline);
    if (!batch.ok()) return batch.status();
    out->mutable_extents()->Reserve(static_cast<int>(batch->extents.size()));
    for (const MergedExtent& e : batch->extents) {
      MergedToProto(e, cursor_.contexts, out->add_extents());
    }
    out->set_next_offset(batch->next_offset);
    out->set_export_size(cursor_.export_size);
    out->set_context(cursor_.contexts.front());
    for (const std::string& c : cursor_.contexts) out->add_contexts(c);
    return StreamStep{batch->extents.empty(), batch->done};
  }

 private:
  ExtentService* service_;
  MultiCursor cursor_;
};

// GetExtents over several contexts: always on the worker pool (each
// context's cache is consulted there; a hit costs one hop).
grpc::ServerUnaryReactor* GetMultiExtents(const CallContext& ctx,
                                          grpc::CallbackServerContext* context,
                                          const v1::GetExtentsRequest& request,
                                          v1::GetExtentsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Admission::Ticket ticket = ctx.admission->TryAcquire(request.export_name());
  if (!ticket) {
    reactor->Finish(OverloadedStatus(*ctx.admission));
    return reactor;
  }
  absl::StatusOr<MultiCursor> cursor =
      PrepareMultiExtents(*ctx.service, request);
  if (!cursor.ok()) {
    reactor->Finish(ToGrpcStatus(cursor.status()));
    return reactor;
  }
  absl::Time deadline = CallDeadline(context, ctx.default_deadline);
  auto pool = ctx.pools->For(cursor->export_name());
  auto shared = std::make_shared<MultiCursor>(*std::move(cursor));
  ExtentService* service = ctx.service;
  FinishOnPool(
      pool, context, reactor, response,
      [service, shared, deadline] {
        return AnswerMulti(service, shared.get(), deadline);
      },
      [ticket = std::move(ticket)](const absl::Status&) mutable {
        ticket.Release();
      });
  return reactor;
}

// GetTotals: the walk runs on the export's worker lane, one slice per
// task (TotalsStep), each rescheduled behind the lane's other work, with
// cancellation and the deadline checked between slices; the admission
// ticket is held until the reactor finishes.
class TotalsCall {
 public:
  static constexpr absl::Duration kSlice = absl::Seconds(1);

  static void Start(const CallContext& ctx, grpc::CallbackServerContext* call,
                    grpc::ServerUnaryReactor* reactor,
                    v1::GetTotalsResponse* response, TotalsCursor cursor,
                    Admission::Ticket ticket) {
    auto self = std::shared_ptr<TotalsCall>(new TotalsCall(
        ctx, call, reactor, response, std::move(cursor), std::move(ticket)));
    Schedule(std::move(self));
  }

 private:
  TotalsCall(const CallContext& ctx, grpc::CallbackServerContext* call,
             grpc::ServerUnaryReactor* reactor, v1::GetTotalsResponse* response,
             TotalsCursor cursor, Admission::Ticket ticket)
      : ctx_(ctx),
        call_(call),
        reactor_(reactor),
        response_(response),
        deadline_(CallDeadline(call, ctx.default_deadline)),
        cursor_(std::move(cursor)),
        ticket_(std::move(ticket)) {}

  static void Schedule(std::shared_ptr<TotalsCall> self) {
    WorkerPools* pools = self->ctx_.pools;
    const std::string name = self->cursor_.export_name();
    pools->Schedule(
        name, [self = std::move(self)]() mutable { Step(std::move(self)); });
  }

  // One slice; runs on the pool, never two at once for one call.
  static void Step(std::shared_ptr<TotalsCall> self) {
    if (self->call_->IsCancelled()) {
      self->Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                                "call cancelled while totalling"));
      return;
    }
    if (absl::Now() >= self->deadline_) {
      self->Finish(ToGrpcStatus(TotalsDeadlineStatus(self->cursor_)));
      return;
    }
    absl::StatusOr<bool> done =
        TotalsStep(self->ctx_.service, &self->cursor_, self->deadline_,
                   absl::Now() + kSlice);
    if (!done.ok()) {
      self->Finish(ToGrpcStatus(done.status()));
      return;
    }
    if (!*done) {
      Schedule(std::move(self));
      return;
    }
    *self->response_ = TotalsResponse(self->cursor_);
    self->Finish(grpc::Status::OK);
  }

  void Finish(grpc::Status status) {
    ticket_.Release();
    reactor_->Finish(std::move(status));
  }

  const CallContext ctx_;
  grpc::CallbackServerContext* const call_;
  grpc::ServerUnaryReactor* const reactor_;
  v1::GetTotalsResponse* const response_;
  const absl::Time deadline_;
  // Touched by one step at a time (each step schedules the next).
  TotalsCursor cursor_;
  Admission::Ticket ticket_;
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
  if (request->contexts_size() > 0) {
    return GetMultiExtents(ctx_, context, *request, response);
  }
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
  auto pool = ctx_.pools->For(query->key.export_name);
  ExtentService* service = ctx_.service;
  FinishOnPool(
      pool, context, reactor, response,
      [service, query = *std::move(query), deadline] {
        return service->Answer(query, deadline);
      },
      [ticket = std::move(ticket)](const absl::Status&) mutable {
        ticket.Release();
      });
  return reactor;
}

grpc::ServerWriteReactor<v1::MapExtentsResponse>*
BlockMetaGrpcService::MapExtents(grpc::CallbackServerContext* context,
                                 const v1::MapExtentsRequest* request) {
  ExtentService* service = ctx_.service;
  if (request->contexts_size() > 0) {
    return BatchStreamReactor<MultiMapSource>::Start(
        ctx_, context, [service, request]() -> absl::StatusOr<MultiMapSource> {
          absl::StatusOr<MultiCursor> cursor =
              PrepareMultiMap(*service, *request);
          if (!cursor.ok()) return cursor.status();
          return MultiMapSource(service, *std::move(cursor));
        });
  }
  return BatchStreamReactor<MapSource>::Start(
      ctx_, context, [service, request]() -> absl::StatusOr<MapSource> {
        absl::StatusOr<ExtentService::Cursor> cursor =
            service->PrepareMap(*request);
        if (!cursor.ok()) return cursor.status();
        return MapSource(service, *std::move(cursor));
      });
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

grpc::ServerUnaryReactor* BlockMetaGrpcService::GetTotals(
    grpc::CallbackServerContext* context, const v1::GetTotalsRequest* request,
    v1::GetTotalsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Admission::Ticket ticket = ctx_.admission->TryAcquire(request->export_name());
  if (!ticket) {
    reactor->Finish(OverloadedStatus(*ctx_.admission));
    return reactor;
  }
  absl::StatusOr<TotalsCursor> cursor = PrepareTotals(*ctx_.service, *request);
  if (!cursor.ok()) {
    ticket.Release();  // before the client can see the answer and call again
    reactor->Finish(ToGrpcStatus(cursor.status()));
    return reactor;
  }
  TotalsCall::Start(ctx_, context, reactor, response, *std::move(cursor),
                    std::move(ticket));
  return reactor;
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
