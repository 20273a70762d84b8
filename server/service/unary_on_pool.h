// server/service/unary_on_pool.h — the one skeleton of a unary gRPC call
// whose work may block (an upstream call, a drain), so it runs on a worker
// pool instead of a gRPC callback thread (grpc issues #36551, #36609:
// blocked callbacks starve the poller).
//
//   grpc::ServerUnaryReactor* Svc::GetThing(grpc::CallbackServerContext* c,
//                                           const Req* req, Resp* resp) {
//     grpc::ServerUnaryReactor* reactor = c->DefaultReactor();
//     ... admission, validation: reactor->Finish(...) and return early ...
//     FinishOnPool(pool, c, reactor, resp,
//                  [=]() -> absl::StatusOr<Resp> { return Blocking(*req); });
//     return reactor;
//   }
//
// What it guarantees, in order, on the pool thread:
//   1. a call cancelled while it waited in the queue is finished CANCELLED
//      ("call cancelled before it was served") and `work` does not run;
//   2. otherwise `work()` runs; its value is moved into *response;
//   3. `done(status)` (optional) runs once with the final status, before
//      the reactor finishes: release an admission ticket, write an audit
//      line, count it; it also runs for the cancelled case;
//   4. the reactor finishes with ToGrpcStatus(status).
// When the pool refuses the task (WorkerPool::Schedule returns false while
// it shuts down), the call finishes UNAVAILABLE at once, after `done`.
//
// `pool` is anything with Schedule(absl::AnyInvocable<void() &&>)
// returning void or bool (WorkerPool, WorkerPools::ExportLane). `work` and
// `done` may capture move-only state (tickets); `request` / `response`
// pointers stay valid until the reactor finishes (gRPC owns them).
// Thread-safety: call from the RPC handler; everything else runs on the
// pool.
#ifndef BLOCKMETA_SERVER_SERVICE_UNARY_ON_POOL_H_
#define BLOCKMETA_SERVER_SERVICE_UNARY_ON_POOL_H_

#include <memory>
#include <type_traits>
#include <utility>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/server_callback.h"
#include "server/service/grpc_status.h"

namespace blockmeta {

// The default `done`: nothing.
struct NoDoneHook {
  void operator()(const absl::Status&) const {}
};

template <typename Response, typename Pool, typename Work,
          typename Done = NoDoneHook>
void FinishOnPool(Pool& pool, grpc::CallbackServerContext* context,
                  grpc::ServerUnaryReactor* reactor, Response* response,
                  Work work, Done done = Done()) {
  // Shared so that a refused task (destroyed unrun) leaves `done` to us.
  auto shared_done = std::make_shared<Done>(std::move(done));
  absl::AnyInvocable<void()&&> task = [context, reactor, response,
                                       work = std::move(work),
                                       shared_done]() mutable {
    absl::Status status;
    if (context->IsCancelled()) {
      status = absl::CancelledError("call cancelled before it was served");
    } else {
      absl::StatusOr<Response> r = work();
      status = r.status();
      if (r.ok()) *response = *std::move(r);
    }
    (*shared_done)(status);
    reactor->Finish(ToGrpcStatus(status));
  };
  if constexpr (std::is_same_v<decltype(pool.Schedule(std::move(task))),
                               bool>) {
    if (!pool.Schedule(std::move(task))) {
      absl::Status status = absl::UnavailableError("server is shutting down");
      (*shared_done)(status);
      reactor->Finish(ToGrpcStatus(status));
    }
  } else {
    pool.Schedule(std::move(task));
  }
}

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_UNARY_ON_POOL_H_
