// server/service/request_log.h — one structured log line per gRPC call,
// with a request id.
//
// The id is the client's `x-request-id` metadata when present (so an
// orchestrator can correlate), else a fresh one (NewRequestId()); it is
// returned to the client in the `x-request-id` initial metadata. Calls that
// end with an error are logged at info level; successful ones at debug
// level (a cache-hit RPC costs ~30 µs; a log line per hit would dominate).
// Fields: request_id, method, code, message (errors), latency_us, peer.
#ifndef BLOCKMETA_SERVER_SERVICE_REQUEST_LOG_H_
#define BLOCKMETA_SERVER_SERVICE_REQUEST_LOG_H_

#include <memory>

#include "grpcpp/support/server_interceptor.h"

namespace blockmeta {

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
RequestLogInterceptorFactory();

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_REQUEST_LOG_H_
