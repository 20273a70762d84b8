// server/upstream/chunked.cc — see chunked.h.
#include "server/upstream/chunked.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "server/common/mutex.h"

namespace blockmeta {
namespace {

struct Join {
  sync::Mutex mu;
  uint64_t remaining ABSL_GUARDED_BY(mu) = 0;
  uint64_t failed_delta ABSL_GUARDED_BY(mu) = UINT64_MAX;
  absl::Status failure ABSL_GUARDED_BY(mu);
  StatusCallback done;  // called by whoever finishes the last piece
};

}  // namespace

void IssueChunked(uint64_t offset, uint64_t count, uint64_t max_piece,
                  PieceIssuer issue, StatusCallback done) {
  if (count == 0) {
    std::move(done)(absl::OkStatus());
    return;
  }
  max_piece = std::max<uint64_t>(max_piece, 1);
  auto join = std::make_shared<Join>();
  join->done = std::move(done);
  {
    sync::MutexLock lock(&join->mu);
    join->remaining = (count + max_piece - 1) / max_piece;
  }
  for (uint64_t delta = 0; delta < count; delta += max_piece) {
    const uint64_t n = std::min(max_piece, count - delta);
    issue(offset + delta, n, delta, [join, delta](absl::Status s) {
      absl::Status result;
      {
        sync::MutexLock lock(&join->mu);
        if (!s.ok() && delta < join->failed_delta) {
          join->failed_delta = delta;
          join->failure = std::move(s);
        }
        if (--join->remaining != 0) return;
        result = join->failure;
      }
      std::move(join->done)(std::move(result));
    });
  }
}

}  // namespace blockmeta
