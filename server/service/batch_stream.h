// server/service/batch_stream.h — the one server-streaming reactor
// skeleton of blockmeta's gRPC services (BlockMeta.MapExtents and the CSI
// SnapshotMetadata streams), with one hook that fills a message.
//
// A Source is what differs between streams:
//   using Response = ...;                    // the streamed message type
//   const std::string& export_name() const;  // whose worker pool runs Fill
//   absl::StatusOr<StreamStep> Fill(Response* out, absl::Time deadline);
// Fill may block on an upstream; it always runs on the export's worker
// pool, never on a gRPC callback thread. It is called again only after the
// previous message was written, so a Source needs no lock.
//
// What the skeleton keeps, for every stream alike:
// * an admission ticket for the whole stream (RESOURCE_EXHAUSTED without);
// * the prepare step (request validation, cheap) on the callback thread;
//   its error ends the stream before any message;
// * every successful stream carries at least one message; after the first,
//   an empty final fill ends the stream without writing;
// * cancellation is checked before every fill, and a failed write (the
//   client went away) ends the stream with CANCELLED;
// * the client's deadline (or the default) bounds every fill.
// (grpc's route_guide callback example keeps one such Lister.)
#ifndef BLOCKMETA_SERVER_SERVICE_BATCH_STREAM_H_
#define BLOCKMETA_SERVER_SERVICE_BATCH_STREAM_H_

#include <atomic>
#include <optional>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/support/server_callback.h"
#include "server/service/call_context.h"
#include "server/service/grpc_status.h"

namespace blockmeta {

// What one Fill produced.
struct StreamStep {
  bool empty = false;  // the message carries no entries
  bool last = false;   // nothing follows it
};

template <typename Source>
class BatchStreamReactor final
    : public grpc::ServerWriteReactor<typename Source::Response> {
 public:
  using Response = typename Source::Response;

  // Starts a stream. `prepare` () -> absl::StatusOr<Source> validates the
  // request; it runs only once the admission ticket is held. The reactor
  // deletes itself when gRPC is done with it.
  template <typename Prepare>
  static BatchStreamReactor* Start(const CallContext& ctx,
                                   grpc::CallbackServerContext* context,
                                   Prepare&& prepare) {
    auto* r = new BatchStreamReactor(ctx, context);
    if (!r->ticket_) {
      r->Finish(OverloadedStatus(*ctx.admission));
      return r;
    }
    absl::StatusOr<Source> source = prepare();
    if (!source.ok()) {
      r->Finish(ToGrpcStatus(source.status()));
      return r;
    }
    r->source_.emplace(*std::move(source));
    r->ProduceNext();
    return r;
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      this->Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                                "client went away during the stream"));
      return;
    }
    if (last_) {
      this->Finish(grpc::Status::OK);
      return;
    }
    ProduceNext();
  }
  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override { delete this; }

 private:
  BatchStreamReactor(const CallContext& ctx,
                     grpc::CallbackServerContext* context)
      : ctx_(ctx),
        deadline_(CallDeadline(context, ctx.default_deadline)),
        ticket_(ctx.admission->TryAcquire()) {}

  void ProduceNext() {
    ctx_.pools->For(source_->export_name())->Schedule([this] {
      if (cancelled_.load()) {
        this->Finish(
            grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled"));
        return;
      }
      response_.Clear();
      absl::StatusOr<StreamStep> step = source_->Fill(&response_, deadline_);
      if (!step.ok()) {
        this->Finish(ToGrpcStatus(step.status()));
        return;
      }
      last_ = step->last;
      if (step->empty && step->last && sent_any_) {
        this->Finish(grpc::Status::OK);
        return;
      }
      sent_any_ = true;
      this->StartWrite(&response_);
    });
  }

  const CallContext ctx_;
  const absl::Time deadline_;
  Admission::Ticket ticket_;
  // Touched only by the one step in progress (a pool task or OnWriteDone);
  // steps are sequential, so no lock is needed.
  std::optional<Source> source_;
  Response response_;
  bool last_ = false;
  bool sent_any_ = false;
  std::atomic<bool> cancelled_{false};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_BATCH_STREAM_H_
