// server/service/csi_grpc.cc — see csi_grpc.h.
#include "server/service/csi_grpc.h"

#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/service/csi_ranges.h"
#include "server/service/grpc_status.h"

namespace blockmeta {
namespace {

constexpr uint32_t kMaxResultsCap = 65536;

// One reactor for both RPCs; Response is GetMetadataAllocatedResponse or
// GetMetadataDeltaResponse (identical shapes).
template <typename Response>
class CsiReactor final : public grpc::ServerWriteReactor<Response> {
 public:
  struct Params {
    std::string export_name;
    std::string context;
    CsiRangeBuilder::Select select;
    int64_t starting_offset = 0;
    int32_t max_results = 0;
    std::string missing_context_hint;  // extra text for FAILED_PRECONDITION
    absl::Status precheck;             // a request error found by the caller
  };

  CsiReactor(const CallContext& ctx, const CsiOptions& options,
             grpc::CallbackServerContext* context, Params p)
      : ctx_(ctx),
        deadline_(CallDeadline(context, ctx.default_deadline)),
        ticket_(ctx.admission->TryAcquire()) {
    if (!ticket_) {
      this->Finish(OverloadedStatus(*ctx.admission));
      return;
    }
    absl::Status s = Start(options, std::move(p));
    if (!s.ok()) {
      this->Finish(ToGrpcStatus(s));
      return;
    }
    ProduceNext();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      this->Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                                "client went away during the stream"));
      return;
    }
    if (finished_) {
      this->Finish(grpc::Status::OK);
      return;
    }
    ProduceNext();
  }
  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override { delete this; }

 private:
  absl::Status Start(const CsiOptions& options, Params p) {
    if (!p.precheck.ok()) return p.precheck;
    if (p.starting_offset < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("starting_offset must not be negative (got ",
                       p.starting_offset, ")"));
    }
    if (p.max_results < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "max_results must not be negative (got ", p.max_results, ")"));
    }
    absl::StatusOr<ExportRef> entry = ctx_.service->FindExport(p.export_name);
    if (!entry.ok()) {
      return absl::NotFoundError(absl::StrCat(
          "no snapshot \"", p.export_name, "\": ", entry.status().message()));
    }
    uint64_t block = options.fixed_block_size;
    uint64_t start = static_cast<uint64_t>(p.starting_offset);
    if (block != 0) start = start / block * block;
    absl::StatusOr<ExtentService::Cursor> cursor = ctx_.service->PrepareStream(
        p.export_name, p.context, start, 0, kMaxResultsCap);
    if (!cursor.ok()) {
      if (cursor.status().code() == absl::StatusCode::kFailedPrecondition) {
        return absl::FailedPreconditionError(
            absl::StrCat(cursor.status().message(), p.missing_context_hint));
      }
      return cursor.status();
    }
    cursor_ = *std::move(cursor);
    cursor_.coalesce = true;
    capacity_ = cursor_.query.export_size;
    max_results_ = p.max_results == 0
                       ? options.default_max_results
                       : std::min<uint32_t>(p.max_results, kMaxResultsCap);
    type_ = block == 0 ? csi::v1::VARIABLE_LENGTH : csi::v1::FIXED_LENGTH;
    builder_.emplace(p.select, block, capacity_);
    return absl::OkStatus();
  }

  // Fills one message (on the pool): pulls batches until max_results
  // ranges are ready or the volume ends.
  void ProduceNext() {
    ctx_.pools->Schedule(cursor_.query.key.export_name, [this] {
      if (cancelled_.load()) {
        this->Finish(
            grpc::Status(grpc::StatusCode::CANCELLED, "call cancelled"));
        return;
      }
      while (!source_done_ && builder_->Ready(false) < max_results_) {
        absl::StatusOr<ExtentService::Batch> batch =
            ctx_.service->NextBatch(&cursor_, deadline_);
        if (!batch.ok()) {
          this->Finish(ToGrpcStatus(batch.status()));
          return;
        }
        for (const Extent& e : batch->extents) builder_->Add(e);
        source_done_ = batch->done;
      }
      std::deque<CsiRange> ranges = builder_->Take(max_results_, source_done_);
      finished_ = source_done_ && builder_->Ready(true) == 0;
      if (ranges.empty() && sent_any_) {
        this->Finish(grpc::Status::OK);
        return;
      }
      response_.Clear();
      response_.set_block_metadata_type(type_);
      response_.set_volume_capacity_bytes(static_cast<int64_t>(capacity_));
      for (const CsiRange& r : ranges) {
        csi::v1::BlockMetadata* m = response_.add_block_metadata();
        m->set_byte_offset(static_cast<int64_t>(r.offset));
        m->set_size_bytes(static_cast<int64_t>(r.length));
      }
      sent_any_ = true;
      this->StartWrite(&response_);
    });
  }

  const CallContext ctx_;
  const absl::Time deadline_;
  Admission::Ticket ticket_;
  // Touched by one sequential step at a time (pool task / OnWriteDone).
  ExtentService::Cursor cursor_;
  std::optional<CsiRangeBuilder> builder_;
  uint64_t capacity_ = 0;
  uint32_t max_results_ = 0;
  csi::v1::BlockMetadataType type_ = csi::v1::UNKNOWN;
  bool source_done_ = false;
  bool finished_ = false;
  bool sent_any_ = false;
  Response response_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace

grpc::ServerWriteReactor<csi::v1::GetMetadataAllocatedResponse>*
CsiSnapshotMetadataService::GetMetadataAllocated(
    grpc::CallbackServerContext* context,
    const csi::v1::GetMetadataAllocatedRequest* request) {
  using Reactor = CsiReactor<csi::v1::GetMetadataAllocatedResponse>;
  Reactor::Params p;
  p.export_name = request->snapshot_id();
  p.context = std::string(kBaseAllocation);
  p.select = CsiRangeBuilder::Select::kAllocated;
  p.starting_offset = request->starting_offset();
  p.max_results = request->max_results();
  return new Reactor(ctx_, options_, context, std::move(p));
}

grpc::ServerWriteReactor<csi::v1::GetMetadataDeltaResponse>*
CsiSnapshotMetadataService::GetMetadataDelta(
    grpc::CallbackServerContext* context,
    const csi::v1::GetMetadataDeltaRequest* request) {
  using Reactor = CsiReactor<csi::v1::GetMetadataDeltaResponse>;
  Reactor::Params p;
  if (request->base_snapshot_id().empty()) {
    p.precheck = absl::InvalidArgumentError(
        "base_snapshot_id is required: it names the checkpoint (dirty "
        "bitmap) the delta starts from");
  }
  p.export_name = request->target_snapshot_id();
  p.context = absl::StrCat(std::string(kDirtyBitmapPrefix),
                           request->base_snapshot_id());
  p.select = CsiRangeBuilder::Select::kDirty;
  p.starting_offset = request->starting_offset();
  p.max_results = request->max_results();
  p.missing_context_hint = absl::StrCat(
      ". No change tracking from base snapshot \"", request->base_snapshot_id(),
      "\" exists for this volume: perform a full backup instead");
  return new Reactor(ctx_, options_, context, std::move(p));
}

}  // namespace blockmeta
