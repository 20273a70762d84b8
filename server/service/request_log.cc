// server/service/request_log.cc — see request_log.h.
#include "server/service/request_log.h"

#include <chrono>
#include <string>

#include "grpcpp/grpcpp.h"
#include "server/common/log.h"

namespace blockmeta {
namespace {

constexpr char kRequestIdKey[] = "x-request-id";
constexpr size_t kMaxClientIdBytes = 128;

class RequestLogInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit RequestLogInterceptor(grpc::experimental::ServerRpcInfo* info)
      : info_(info), start_(std::chrono::steady_clock::now()) {}

  void Intercept(
      grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      auto* md = methods->GetRecvInitialMetadata();
      if (md != nullptr) {
        auto it = md->find(kRequestIdKey);
        if (it != md->end() && !it->second.empty() &&
            it->second.size() <= kMaxClientIdBytes) {
          request_id_.assign(it->second.data(), it->second.size());
        }
      }
    }
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      EnsureId();
      methods->GetSendInitialMetadata()->emplace(kRequestIdKey, request_id_);
    }
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::PRE_SEND_STATUS)) {
      EnsureId();
      grpc::Status status = methods->GetSendStatus();
      int64_t us = std::chrono::duration_cast<std::chrono::microseconds>(
                       std::chrono::steady_clock::now() - start_)
                       .count();
      const char* method = info_->method() == nullptr ? "" : info_->method();
      std::string peer = info_->server_context() == nullptr
                             ? ""
                             : info_->server_context()->peer();
      if (status.ok()) {
        LogDebug("rpc", {{"request_id", request_id_},
                         {"method", method},
                         {"code", "OK"},
                         {"latency_us", us},
                         {"peer", peer}});
      } else {
        LogInfo("rpc", {{"request_id", request_id_},
                        {"method", method},
                        {"code", static_cast<int>(status.error_code())},
                        {"message", status.error_message()},
                        {"latency_us", us},
                        {"peer", peer}});
      }
    }
    methods->Proceed();
  }

 private:
  void EnsureId() {
    if (request_id_.empty()) request_id_ = NewRequestId();
  }

  grpc::experimental::ServerRpcInfo* info_;
  std::chrono::steady_clock::time_point start_;
  std::string request_id_;
};

class Factory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RequestLogInterceptor(info);
  }
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
RequestLogInterceptorFactory() {
  return std::make_unique<Factory>();
}

}  // namespace blockmeta
