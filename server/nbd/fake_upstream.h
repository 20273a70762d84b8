// server/nbd/fake_upstream.h — an in-memory Upstream for the shim's unit
// tests and fuzzer (testonly). Integration tests use real nbdkit/qemu-nbd.
//
// The disk is `size` bytes in blocks of `block` bytes. base:allocation
// reports a block as HOLE|ZERO until it is written, then as data (trim
// makes it a hole again); the dirty bitmap context (if enabled) reports a
// block DIRTY once written. BlockStatus answers are contiguous runs from the
// offset, covering at most `length` rounded up to a block, and are counted.
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_NBD_FAKE_UPSTREAM_H_
#define BLOCKMETA_SERVER_NBD_FAKE_UPSTREAM_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "server/common/mutex.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace nbd {

class FakeUpstream : public Upstream {
 public:
  FakeUpstream(uint64_t size, uint32_t block, bool with_bitmap);

  // Test knobs (call before serving).
  UpstreamInfo& mutable_info() { return info_; }
  void set_ready(bool ready) { ready_ = ready; }
  // Marks [offset, offset+length) as data without counting as a write.
  void Fill(uint64_t offset, uint64_t length, char byte);

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
};

}  // namespace nbd
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_NBD_FAKE_UPSTREAM_H_
