// tests/testing/fake_upstream.h — an in-memory Upstream for unit tests
// and the shim's fuzzer (testonly). Integration tests use real nbdkit /
// qemu-nbd.
//
// The disk is `size` bytes in blocks of `block` bytes. base:allocation
// reports a block as HOLE|ZERO until it is written, then as data (trim
// makes it a hole again); the dirty bitmap context (if enabled) reports a
// block DIRTY once written. BlockStatus answers are contiguous runs from the
// offset, covering at most `length` rounded up to a block, and are counted.
//
// For tests of the service logic a context can instead be given a fixed
// truth table (SetContextTruth): any flags (allocated zeroes, holes that do
// not read as zero, ...), answered like servers that reply past the
// requested length (up to SetReplyExtentsMax extents). BlockStatus can be
// made to fail (FailNextBlockStatus) and the upstream to be down
// (set_ready(false): Info() and every call UNAVAILABLE).
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_TESTS_TESTING_FAKE_UPSTREAM_H_
#define BLOCKMETA_TESTS_TESTING_FAKE_UPSTREAM_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "server/common/mutex.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

class FakeUpstream : public Upstream {
 public:
  FakeUpstream(uint64_t size, uint32_t block, bool with_bitmap);

  // Test knobs (call before serving).
  UpstreamInfo& mutable_info() { return info_; }
  void set_ready(bool ready) { ready_ = ready; }
  // Marks [offset, offset+length) as data without counting as a write.
  void Fill(uint64_t offset, uint64_t length, char byte);
  // Answers `context` from `truth` (extents tiling [0, size)) from now on;
  // adds the context to the negotiated ones. Call before serving.
  void SetContextTruth(const std::string& context, ExtentList truth);
  // The next `n` BlockStatus calls fail with `status`.
  void FailNextBlockStatus(int n, absl::Status status);
  // Truth-table answers carry at most `n` extents (default: unlimited).
  void SetReplyExtentsMax(size_t n);

  uint64_t block_status_calls() const { return block_status_calls_.load(); }
  uint64_t data_calls() const { return data_calls_.load(); }

  bool Ready() const override { return ready_; }
  absl::StatusOr<UpstreamInfo> Info() const override;
  std::string LastError() const override { return ""; }
  uint64_t Generation() const override { return 1; }
  void SetOnGenerationChange(std::function<void()>) override {}
  absl::StatusOr<ExtentList> BlockStatus(const std::string& context,
                                         uint64_t offset, uint64_t length,
                                         absl::Time deadline) override;
  absl::Status Pread(void* buf, uint64_t count, uint64_t offset,
                     absl::Time deadline) override;
  absl::Status Pwrite(const void* buf, uint64_t count, uint64_t offset,
                      uint32_t flags, absl::Time deadline) override;
  absl::Status Trim(uint64_t count, uint64_t offset, uint32_t flags,
                    absl::Time deadline) override;
  absl::Status Zero(uint64_t count, uint64_t offset, uint32_t flags,
                    absl::Time deadline) override;
  absl::Status Flush(absl::Time deadline) override;
  absl::Status Cache(uint64_t count, uint64_t offset,
                     absl::Time deadline) override;

 private:
  void Mark(uint64_t offset, uint64_t length, bool allocated)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  UpstreamInfo info_;  // set up before use, then constant
  const uint32_t block_;
  std::atomic<bool> ready_{true};
  std::atomic<uint64_t> block_status_calls_{0};
  std::atomic<uint64_t> data_calls_{0};

  mutable sync::Mutex mu_;
  std::string data_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> allocated_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> dirty_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, ExtentList> truth_ ABSL_GUARDED_BY(mu_);
  int fail_next_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status fail_status_ ABSL_GUARDED_BY(mu_);
  size_t reply_extents_max_ ABSL_GUARDED_BY(mu_) = SIZE_MAX;
};

// A shared_ptr that does not own `u` (a fake on the stack or a member), for
// interfaces that take a weak reference (nbd::ShimExport::upstream): keep
// the returned pointer alive as long as the reference must stay valid.
inline std::shared_ptr<Upstream> Unowned(Upstream* u) {
  return std::shared_ptr<Upstream>(u, [](Upstream*) {});
}

}  // namespace blockmeta

#endif  // BLOCKMETA_TESTS_TESTING_FAKE_UPSTREAM_H_
