// client/blockmeta_client.cc — gRPC implementation of BlockMetaClient and
// its resumable ExtentIterator (see blockmeta_client.h).
#include "client/blockmeta_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "blockmeta/v1/admin.grpc.pb.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "client/channel.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace blockmeta::client {
namespace {

using HealthStub = ::grpc::health::v1::Health::Stub;

// Tags of the (at most one) operation in flight on a stream.
void* const kStartTag = reinterpret_cast<void*>(1);
void* const kReadTag = reinterpret_cast<void*>(2);
void* const kFinishTag = reinterpret_cast<void*>(3);

// One MapExtents stream on its own completion queue, read with a timeout per
// operation. At most one operation is in flight at a time. The destructor
// cancels an unfinished call and drains the queue.
class MapStream {
 public:
  MapStream(v1::BlockMeta::Stub* stub, const v1::MapExtentsRequest& request)
      : reader_(stub->PrepareAsyncMapExtents(&context_, request, &cq_)) {}

  ~MapStream() {
    if (!finished_) {
      context_.TryCancel();
      if (pending_) WaitForever();
      if (started_) {
        grpc::Status ignored;
        reader_->Finish(&ignored, kFinishTag);
        pending_ = true;
        WaitForever();
      }
    }
    cq_.Shutdown();
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) {
    }
  }

  // Reads the next message. Returns OK with *more = true and `*out` filled,
  // OK with *more = false at a clean end of stream, or the stream's error
  // (DEADLINE_EXCEEDED when nothing arrived within `timeout`).
  absl::Status Read(v1::MapExtentsResponse* out, absl::Duration timeout,
                    bool* more) {
    *more = false;
    if (!started_) {
      reader_->StartCall(kStartTag);
      started_ = true;
      pending_ = true;
      bool ok = false;
      if (!Wait(timeout, &ok)) return TimedOut(timeout);
      if (!ok) return Finish();
    }
    reader_->Read(out, kReadTag);
    pending_ = true;
    bool ok = false;
    if (!Wait(timeout, &ok)) return TimedOut(timeout);
    if (!ok) return Finish();
    *more = true;
    return absl::OkStatus();
  }

 private:
  // Waits for the pending operation; false on timeout (still pending).
  bool Wait(absl::Duration timeout, bool* ok) {
    void* tag = nullptr;
    switch (cq_.AsyncNext(&tag, ok, DeadlineFromNow(timeout))) {
      case grpc::CompletionQueue::GOT_EVENT:
        pending_ = false;
        return true;
      case grpc::CompletionQueue::TIMEOUT:
        return false;
      case grpc::CompletionQueue::SHUTDOWN:
        pending_ = false;
        *ok = false;
        return true;
    }
    return false;
  }

  void WaitForever() {
    void* tag;
    bool ok;
    if (cq_.Next(&tag, &ok)) pending_ = false;
  }

  absl::Status Finish() {
    grpc::Status status;
    reader_->Finish(&status, kFinishTag);
    pending_ = true;
    WaitForever();
    finished_ = true;
    return FromGrpcStatus(status);
  }

  absl::Status TimedOut(absl::Duration timeout) {
    context_.TryCancel();
    WaitForever();  // The cancelled operation completes promptly.
    (void)Finish();
    return absl::DeadlineExceededError(absl::StrCat(
        "no extents from the server within ", absl::FormatDuration(timeout)));
  }

  grpc::ClientContext context_;
  grpc::CompletionQueue cq_;
  std::unique_ptr<grpc::ClientAsyncReader<v1::MapExtentsResponse>> reader_;
  bool started_ = false;
  bool pending_ = false;
  bool finished_ = false;
};

class GrpcExtentIterator final : public ExtentIterator {
 public:
  GrpcExtentIterator(std::shared_ptr<grpc::Channel> channel,
                     std::shared_ptr<v1::BlockMeta::Stub> stub,
                     const ClientOptions& options,
                     v1::MapExtentsRequest request)
      : channel_(std::move(channel)),
        stub_(std::move(stub)),
        deadline_(options.deadline),
        retry_(options.retry),
        request_(std::move(request)),
        position_(request_.offset()) {}

  absl::StatusOr<bool> Next(v1::Extent* extent) override {
    while (true) {
      if (index_ < batch_.extents_size()) {
        *extent = batch_.extents(index_++);
        position_ = extent->offset() + extent->length();
        return true;
      }
      if (done_) {
        if (!final_.ok()) return final_;
        return false;
      }
      absl::Status s = FetchBatch();
      if (s.ok()) continue;
      s = MarkIfUnreachable(std::move(s), *channel_);
      stream_.reset();
      if (IsTransient(s) && ++failures_ < retry_.max_attempts) {
        absl::SleepFor(Backoff(failures_));
        ++resumes_;
        continue;
      }
      done_ = true;
      if (failures_ > 1) {
        absl::Status with_count(
            s.code(),
            absl::StrCat(s.message(), " (after ", failures_, " attempts)"));
        s.ForEachPayload([&](absl::string_view url, const absl::Cord& p) {
          with_count.SetPayload(url, p);
        });
        s = with_count;
      }
      final_ = s;
      return s;
    }
  }

  uint64_t position() const override { return position_; }
  uint64_t range_end() const override { return range_end_; }
  uint64_t export_size() const override { return export_size_; }
  const std::string& context() const override { return context_; }
  int resumes() const override { return resumes_; }

 private:
  absl::Duration Backoff(int failure) {
    absl::Duration d = retry_.initial_backoff;
    for (int i = 1; i < failure && d < retry_.max_backoff; ++i) d *= 2;
    d = std::min(d, retry_.max_backoff);
    return d * absl::Uniform(bitgen_, 0.8, 1.2);
  }

  // Reads one batch into batch_ (index_ = 0), or marks the range complete,
  // or returns an error. Opens a stream from position_ when none is open.
  absl::Status FetchBatch() {
    if (stream_ == nullptr) {
      v1::MapExtentsRequest req = request_;
      req.set_offset(position_);
      if (learned_range_) {
        req.set_length(range_end_ - position_);
      }
      stream_ = std::make_unique<MapStream>(stub_.get(), req);
    }
    bool more = false;
    batch_.Clear();
    index_ = 0;
    absl::Status s = stream_->Read(&batch_, deadline_, &more);
    if (!s.ok()) {
      batch_.Clear();
      return s;
    }
    if (!more) {
      stream_.reset();
      if (!learned_range_ || position_ != range_end_) {
        return absl::InternalError(absl::StrCat(
            "server ended the MapExtents stream at offset ", position_,
            !learned_range_
                ? " without sending any extents"
                : absl::StrCat(" before the range end ", range_end_)));
      }
      done_ = true;
      return absl::OkStatus();
    }
    if (absl::Status v = Validate(); !v.ok()) {
      batch_.Clear();
      done_ = true;
      final_ = v;
      return absl::OkStatus();  // Next() reports final_.
    }
    if (batch_.extents_size() > 0) failures_ = 0;
    return absl::OkStatus();
  }

  // Checks one batch against the stream contract and learns the range.
  absl::Status Validate() {
    if (!learned_range_) {
      learned_range_ = true;
      export_size_ = batch_.export_size();
      context_ = batch_.context();
      uint64_t end = export_size_;
      if (request_.length() > 0 &&
          request_.length() <=
              export_size_ - std::min(export_size_, request_.offset())) {
        end = request_.offset() + request_.length();
      }
      range_end_ = end;
    }
    uint64_t at = position_;
    for (const v1::Extent& e : batch_.extents()) {
      if (e.offset() != at || e.length() == 0 ||
          e.length() > range_end_ - std::min(range_end_, e.offset())) {
        return absl::InternalError(absl::StrCat(
            "server broke the MapExtents contract: extent [", e.offset(), ", +",
            e.length(), ") where one starting at ", at, " and ending by ",
            range_end_, " was expected"));
      }
      at = e.offset() + e.length();
    }
    if (batch_.next_offset() != at) {
      return absl::InternalError(absl::StrCat(
          "server broke the MapExtents contract: batch next_offset ",
          batch_.next_offset(), " but its extents end at ", at));
    }
    return absl::OkStatus();
  }

  const std::shared_ptr<grpc::Channel> channel_;
  const std::shared_ptr<v1::BlockMeta::Stub> stub_;
  const absl::Duration deadline_;
  const RetryPolicy retry_;
  const v1::MapExtentsRequest request_;

  std::unique_ptr<MapStream> stream_;
  v1::MapExtentsResponse batch_;
  int index_ = 0;
  uint64_t position_;
  uint64_t range_end_ = 0;
  bool learned_range_ = false;  // range_end_ is known (the first batch came)
  uint64_t export_size_ = 0;
  std::string context_;
  int failures_ = 0;
  int resumes_ = 0;
  bool done_ = false;
  absl::Status final_;
  absl::BitGen bitgen_;
};

class GrpcBlockMetaClient final : public BlockMetaClient {
 public:
  GrpcBlockMetaClient(ClientOptions options,
                      const std::shared_ptr<grpc::Channel>& channel)
      : BlockMetaClient(std::move(options)),
        channel_(channel),
        stub_(std::shared_ptr<v1::BlockMeta::Stub>(
            v1::BlockMeta::NewStub(channel))),
        health_(grpc::health::v1::Health::NewStub(channel)),
        admin_(v1::Admin::NewStub(channel)) {}

  absl::StatusOr<v1::AddExportResponse> AddExport(
      const v1::AddExportRequest& request) override {
    return AdminUnary(&v1::Admin::Stub::AddExport, request);
  }
  absl::StatusOr<v1::RemoveExportResponse> RemoveExport(
      absl::string_view name) override {
    v1::RemoveExportRequest req;
    req.set_name(std::string(name));
    return AdminUnary(&v1::Admin::Stub::RemoveExport, req);
  }
  absl::StatusOr<v1::AdminListExportsResponse> AdminListExports() override {
    return AdminUnary(&v1::Admin::Stub::ListExports,
                      v1::AdminListExportsRequest());
  }

  absl::StatusOr<v1::ListExportsResponse> ListExports() override {
    return Unary(&v1::BlockMeta::Stub::ListExports, v1::ListExportsRequest());
  }

  absl::StatusOr<v1::ExportInfo> GetExportInfo(
      absl::string_view export_name) override {
    v1::GetExportInfoRequest req;
    req.set_export_name(std::string(export_name));
    return Unary(&v1::BlockMeta::Stub::GetExportInfo, req);
  }

  absl::StatusOr<v1::GetExtentsResponse> GetExtents(
      const v1::GetExtentsRequest& request) override {
    return Unary(&v1::BlockMeta::Stub::GetExtents, request);
  }

  absl::StatusOr<v1::GetTotalsResponse> GetTotals(
      const v1::GetTotalsRequest& request) override {
    return Unary(&v1::BlockMeta::Stub::GetTotals, request);
  }

  absl::StatusOr<v1::InvalidateCacheResponse> InvalidateCache(
      const v1::InvalidateCacheRequest& request) override {
    return Unary(&v1::BlockMeta::Stub::InvalidateCache, request);
  }

  absl::StatusOr<v1::GetStatsResponse> GetStats(
      absl::string_view export_name) override {
    v1::GetStatsRequest req;
    req.set_export_name(std::string(export_name));
    return Unary(&v1::BlockMeta::Stub::GetStats, req);
  }

  absl::StatusOr<ServingStatus> Health(absl::string_view service) override {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(std::string(service));
    grpc::health::v1::HealthCheckResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineFromNow(options().deadline));
    grpc::Status s = health_->Check(&ctx, req, &resp);
    if (!s.ok()) return FromGrpcCall(s, *channel_);
    switch (resp.status()) {
      case grpc::health::v1::HealthCheckResponse::SERVING:
        return ServingStatus::kServing;
      case grpc::health::v1::HealthCheckResponse::NOT_SERVING:
        return ServingStatus::kNotServing;
      default:
        return ServingStatus::kUnknown;
    }
  }

  std::unique_ptr<ExtentIterator> MapExtents(
      const v1::MapExtentsRequest& request) override {
    return std::make_unique<GrpcExtentIterator>(channel_, stub_, options(),
                                                request);
  }

 private:
  template <typename Req, typename Resp>
  absl::StatusOr<Resp> Unary(grpc::Status (v1::BlockMeta::Stub::*method)(
                                 grpc::ClientContext*, const Req&, Resp*),
                             const Req& request) {
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineFromNow(options().deadline));
    Resp resp;
    grpc::Status s = ((*stub_).*method)(&ctx, request, &resp);
    if (!s.ok()) return FromGrpcCall(s, *channel_);
    return resp;
  }

  template <typename Req, typename Resp>
  absl::StatusOr<Resp> AdminUnary(grpc::Status (v1::Admin::Stub::*method)(
                                      grpc::ClientContext*, const Req&, Resp*),
                                  const Req& request) {
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineFromNow(options().deadline));
    Resp resp;
    grpc::Status s = ((*admin_).*method)(&ctx, request, &resp);
    if (!s.ok()) return FromGrpcCall(s, *channel_);
    return resp;
  }

  const std::shared_ptr<grpc::Channel> channel_;
  const std::shared_ptr<v1::BlockMeta::Stub> stub_;
  const std::unique_ptr<HealthStub> health_;
  const std::unique_ptr<v1::Admin::Stub> admin_;
};

}  // namespace

const char* ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kServing:
      return "SERVING";
    case ServingStatus::kNotServing:
      return "NOT_SERVING";
    case ServingStatus::kUnknown:
      break;
  }
  return "UNKNOWN";
}

bool IsServerUnreachable(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable &&
         status.GetPayload(kUnreachablePayload).has_value();
}

bool IsTransient(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
      return true;
    default:
      return false;
  }
}

absl::StatusOr<std::unique_ptr<BlockMetaClient>> BlockMetaClient::Connect(
    const ClientOptions& options) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(options);
  if (!channel.ok()) return channel.status();
  return std::unique_ptr<BlockMetaClient>(
      new GrpcBlockMetaClient(options, *std::move(channel)));
}

absl::StatusOr<v1::GetTotalsResponse> BlockMetaClient::GetTotals(
    const v1::GetTotalsRequest&) {
  return absl::UnimplementedError("GetTotals");
}

absl::StatusOr<v1::AddExportResponse> BlockMetaClient::AddExport(
    const v1::AddExportRequest&) {
  return absl::UnimplementedError("AddExport");
}

absl::StatusOr<v1::RemoveExportResponse> BlockMetaClient::RemoveExport(
    absl::string_view) {
  return absl::UnimplementedError("RemoveExport");
}

absl::StatusOr<v1::AdminListExportsResponse>
BlockMetaClient::AdminListExports() {
  return absl::UnimplementedError("ListExports");
}

}  // namespace blockmeta::client
