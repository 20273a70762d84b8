// server/service/fake_upstream.h — an in-memory Upstream for unit tests of
// the service logic (integration tests use real nbdkit / qemu-nbd).
//
// Each context has a truth table: a list of extents covering the disk.
// BlockStatus answers from it like an NBD server may: from `offset`, up to
// `reply_extents_max` extents, possibly running past the requested length.
// Counts calls; can be told to fail, to block until released, or to be
// "down" (Info() unavailable).
#ifndef BLOCKMETA_SERVER_SERVICE_FAKE_UPSTREAM_H_
#define BLOCKMETA_SERVER_SERVICE_FAKE_UPSTREAM_H_

#include <atomic>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "server/common/mutex.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

class FakeUpstream final : public Upstream {
 public:
  explicit FakeUpstream(uint64_t size);

  // Sets the truth of a context (extents must tile [0, size)).
  void SetContext(const std::string& context, ExtentList truth);
  void SetDown(bool down);
  void FailNextCalls(int n, absl::Status status);
  void SetReplyExtentsMax(size_t n);
  int calls() const { return calls_.load(); }

  bool Ready() const override;
  absl::StatusOr<UpstreamInfo> Info() const override;
  std::string LastError() const override;
  uint64_t Generation() const override { return 0; }
  void SetOnGenerationChange(std::function<void()>) override {}
  absl::StatusOr<ExtentList> BlockStatus(const std::string& context,
                                         uint64_t offset, uint64_t length,
                                         absl::Time deadline) override;
  absl::Status Pread(void*, uint64_t, uint64_t, absl::Time) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Pwrite(const void*, uint64_t, uint64_t, uint32_t,
                      absl::Time) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Trim(uint64_t, uint64_t, uint32_t, absl::Time) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Zero(uint64_t, uint64_t, uint32_t, absl::Time) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Flush(absl::Time) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Cache(uint64_t, uint64_t, absl::Time) override {
    return absl::UnimplementedError("fake");
  }

 private:
  const uint64_t size_;
  mutable sync::Mutex mu_;
  std::map<std::string, ExtentList> truth_ ABSL_GUARDED_BY(mu_);
  bool down_ ABSL_GUARDED_BY(mu_) = false;
  int fail_next_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status fail_status_ ABSL_GUARDED_BY(mu_);
  size_t reply_extents_max_ ABSL_GUARDED_BY(mu_) = 1000000;
  std::atomic<int> calls_{0};
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_FAKE_UPSTREAM_H_
