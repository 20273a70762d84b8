// server/service/health_grpc.cc — see health_grpc.h.
#include "server/service/health_grpc.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace blockmeta {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// Only a bounded prefix of the caller's service name goes into a message.
constexpr size_t kMaxQuotedName = 256;

HealthCheckResponse::ServingStatus ToProto(HealthStatus s, bool watch) {
  switch (s) {
    case HealthStatus::kServing:
      return HealthCheckResponse::SERVING;
    case HealthStatus::kNotServing:
      return HealthCheckResponse::NOT_SERVING;
    case HealthStatus::kUnknown:
      break;
  }
  return watch ? HealthCheckResponse::SERVICE_UNKNOWN
               : HealthCheckResponse::UNKNOWN;
}

}  // namespace

// One Watch stream. Deletes itself in OnDone, after leaving watchers_.
class HealthGrpcService::WatchReactor final
    : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  WatchReactor(HealthGrpcService* service, std::string name)
      : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }

  // Sends `status` unless it is what the client last got (or will get);
  // with `then_end` the stream ends after it. Called under service_->mu_.
  void Push(HealthCheckResponse::ServingStatus status, bool then_end) {
    sync::MutexLock lock(&mu_);
    if (finished_) return;
    want_ = status;
    end_after_write_ = end_after_write_ || then_end;
    MaybeWriteLocked();
  }

 private:
  void OnWriteDone(bool ok) override {
    sync::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
      return;
    }
    MaybeWriteLocked();
  }
  void OnCancel() override {
    sync::MutexLock lock(&mu_);
    FinishLocked(grpc::Status::CANCELLED);
  }
  void OnDone() override {
    {
      sync::MutexLock lock(&service_->mu_);
      service_->watchers_.erase(this);
    }
    delete this;
  }

  // Writes want_ if it differs from what was sent and nothing is in
  // flight; ends the stream when asked to and everything was written.
  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    mu_.AssertHeld();
    if (finished_ || writing_) return;
    if (!sent_any_ || want_ != sent_) {
      sent_any_ = true;
      sent_ = want_;
      response_.set_status(sent_);
      writing_ = true;
      StartWrite(&response_);
      return;
    }
    if (end_after_write_) FinishLocked(grpc::Status::OK);
  }
  void FinishLocked(const grpc::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    mu_.AssertHeld();
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  HealthGrpcService* const service_;  // outlives every call (health_grpc.h)
  const std::string name_;
  sync::Mutex mu_;
  HealthCheckResponse response_ ABSL_GUARDED_BY(mu_);
  HealthCheckResponse::ServingStatus want_ ABSL_GUARDED_BY(mu_) =
      HealthCheckResponse::UNKNOWN;
  HealthCheckResponse::ServingStatus sent_ ABSL_GUARDED_BY(mu_) =
      HealthCheckResponse::UNKNOWN;
  bool sent_any_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool end_after_write_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

HealthGrpcService::HealthGrpcService(StatusFn status)
    : status_(std::move(status)) {}

HealthGrpcService::~HealthGrpcService() = default;

HealthStatus HealthGrpcService::Evaluate(const std::string& service) const {
  return status_(service);
}

void HealthGrpcService::Refresh() {
  sync::MutexLock lock(&mu_);
  if (shutdown_) return;
  for (WatchReactor* w : watchers_) {
    w->Push(ToProto(Evaluate(w->name()), /*watch=*/true), /*then_end=*/false);
  }
}

void HealthGrpcService::Shutdown() {
  sync::MutexLock lock(&mu_);
  shutdown_ = true;
  for (WatchReactor* w : watchers_) {
    w->Push(HealthCheckResponse::NOT_SERVING, /*then_end=*/true);
  }
}

grpc::ServerUnaryReactor* HealthGrpcService::Check(
    grpc::CallbackServerContext* context, const HealthCheckRequest* request,
    HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  HealthStatus s;
  {
    sync::MutexLock lock(&mu_);
    s = shutdown_ ? HealthStatus::kNotServing : HealthStatus::kUnknown;
  }
  if (s == HealthStatus::kUnknown) s = Evaluate(request->service());
  if (s == HealthStatus::kUnknown) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("unknown health service \"",
                     request->service().substr(0, kMaxQuotedName), "\"")));
    return reactor;
  }
  response->set_status(ToProto(s, /*watch=*/false));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthGrpcService::Watch(
    grpc::CallbackServerContext* /*context*/,
    const HealthCheckRequest* request) {
  auto* w = new WatchReactor(this, request->service());
  sync::MutexLock lock(&mu_);
  watchers_.insert(w);
  if (shutdown_) {
    w->Push(HealthCheckResponse::NOT_SERVING, /*then_end=*/true);
  } else {
    w->Push(ToProto(Evaluate(w->name()), /*watch=*/true), /*then_end=*/false);
  }
  return w;
}

}  // namespace blockmeta
