// server/service/fake_upstream.cc — see fake_upstream.h.
#include "server/service/fake_upstream.h"

#include <algorithm>
#include <utility>

namespace blockmeta {

FakeUpstream::FakeUpstream(uint64_t size) : size_(size) {}

void FakeUpstream::SetContext(const std::string& context, ExtentList truth) {
  sync::MutexLock lock(&mu_);
  truth_[context] = std::move(truth);
}

void FakeUpstream::SetDown(bool down) {
  sync::MutexLock lock(&mu_);
  down_ = down;
}

void FakeUpstream::FailNextCalls(int n, absl::Status status) {
  sync::MutexLock lock(&mu_);
  fail_next_ = n;
  fail_status_ = std::move(status);
}

void FakeUpstream::SetReplyExtentsMax(size_t n) {
  sync::MutexLock lock(&mu_);
  reply_extents_max_ = n;
}

bool FakeUpstream::Ready() const {
  sync::MutexLock lock(&mu_);
  return !down_;
}

absl::StatusOr<UpstreamInfo> FakeUpstream::Info() const {
  sync::MutexLock lock(&mu_);
  if (down_) return absl::UnavailableError("fake upstream is down");
  UpstreamInfo info;
  info.size = size_;
  for (const auto& [name, unused] : truth_) info.contexts.push_back(name);
  info.description = "fake";
  return info;
}

std::string FakeUpstream::LastError() const {
  sync::MutexLock lock(&mu_);
  return down_ ? "fake upstream is down" : "";
}

absl::StatusOr<ExtentList> FakeUpstream::BlockStatus(const std::string& context,
                                                     uint64_t offset,
                                                     uint64_t length,
                                                     absl::Time) {
  calls_.fetch_add(1);
  sync::MutexLock lock(&mu_);
  if (down_) return absl::UnavailableError("fake upstream is down");
  if (fail_next_ > 0) {
    --fail_next_;
    return fail_status_;
  }
  auto it = truth_.find(context);
  if (it == truth_.end()) {
    return absl::FailedPreconditionError("context not negotiated");
  }
  ExtentList out;
  for (const Extent& e : it->second) {
    if (e.end() <= offset) continue;
    if (out.size() >= reply_extents_max_) break;
    if (!out.empty() && e.offset >= offset + length) break;
    Extent piece = e;
    if (piece.offset < offset) {
      piece.length -= offset - piece.offset;
      piece.offset = offset;
    }
    out.push_back(piece);
  }
  return out;
}

}  // namespace blockmeta
