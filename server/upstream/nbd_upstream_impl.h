// server/upstream/nbd_upstream_impl.h — NbdUpstream, the libnbd
// implementation of Upstream (internal to server/upstream; made by
// CreateUpstream, nbd_upstream.h, whose header comment describes the
// behaviour): range and capability checks, chunking of large requests,
// the FUA fallback, and the synchronous forms waiting on the asynchronous
// ones. The pool itself is a Core (nbd_core.h).
//
// Ownership: the facade holds its Core by shared_ptr; completions it hands
// to the Core (the FUA fallback's flush) hold the Core, never the facade.
// Close() fails what is in flight at once and stops reconnecting; the
// destructor shuts the Core down (what is still in flight completes with
// UNAVAILABLE; the spawned server is stopped).
//
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_IMPL_H_
#define BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_IMPL_H_

#include <libnbd.h>
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/common/mutex.h"
#include "server/common/pending.h"
#include "server/upstream/nbd_core.h"
#include "server/upstream/nbd_op.h"
#include "server/upstream/upstream.h"

namespace blockmeta {
namespace upstream_internal {

using ::blockmeta::Pending;

// An nbd_aio_* call with its completion; returns the cookie (-1: failed).
using IssueCall =
    absl::FunctionRef<int64_t(nbd_handle*, nbd_completion_callback)>;

class NbdUpstream : public Upstream {
 public:
  NbdUpstream(std::shared_ptr<Core> core, uint64_t change_granularity)
      : core_(std::move(core)), change_granularity_(change_granularity) {
    core_->Start();
  }
  ~NbdUpstream() override { core_->Shutdown(); }

  bool Ready() const override { return core_->Ready(); }
  bool WaitReady(absl::Time deadline) override {
    return core_->WaitReady(deadline);
  }
  absl::StatusOr<UpstreamInfo> Info() const override { return core_->Info(); }
  uint64_t ChangeGranularity() const override { return change_granularity_; }
  std::string LastError() const override { return core_->LastError(); }
  uint64_t Generation() const override { return core_->Generation(); }
  void SetOnGenerationChange(std::function<void()> fn) override {
    core_->SetOnGenerationChange(std::move(fn));
  }
  UpstreamStats Stats() const override { return core_->Stats(); }
  void Close(const absl::Status& why) override { core_->Close(why); }

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

  void AsyncBlockStatus(const std::string& context, uint64_t offset,
                        uint64_t length, ExtentsCallback done) override;
  void AsyncPread(void* buf, uint64_t count, uint64_t offset,
                  StatusCallback done) override;
  void AsyncPwrite(const void* buf, uint64_t count, uint64_t offset,
                   uint32_t flags, StatusCallback done) override;
  void AsyncTrim(uint64_t count, uint64_t offset, uint32_t flags,
                 StatusCallback done) override;
  void AsyncZero(uint64_t count, uint64_t offset, uint32_t flags,
                 StatusCallback done) override;
  void AsyncFlush(StatusCallback done) override;
  void AsyncCache(uint64_t count, uint64_t offset,
                  StatusCallback done) override;

  pid_t ServerPid() const { return core_->ServerPid(); }
  std::string ServerSocket() const { return core_->ServerSocket(); }
  int LiveConnections() const { return core_->LiveConnections(); }

 private:
  // What BeginWrite hands the command that passed its checks.
  struct WriteStart {
    UpstreamInfo info;
    uint32_t nbd_flags = 0;  // LIBNBD_CMD_FLAG_FUA when asked and honoured
    StatusCallback done;     // the caller's, behind the FUA fallback
  };
  // The one preamble of the commands that change data (WRITE, TRIM,
  // WRITE_ZEROES): connected, writable, in range, and `supported` (the
  // command's capability check) passes; a FUA the server cannot honour
  // becomes a flush after the command (the same guarantee). On failure
  // `done` has been called with the error and nullopt is returned.
  std::optional<WriteStart> BeginWrite(
      const char* what, uint64_t count, uint64_t offset, uint32_t flags,
      StatusCallback done,
      absl::FunctionRef<absl::Status(const UpstreamInfo&)> supported);
  // Starts an asynchronous command and waits for its result until
  // `deadline`; then DEADLINE_EXCEEDED (the command goes on).
  template <typename T>
  T Await(const char* what, absl::Time deadline,
          absl::FunctionRef<void(absl::AnyInvocable<void(T) &&>)> start);
  absl::Status CheckRange(const UpstreamInfo& info, uint64_t count,
                          uint64_t offset, absl::string_view what) const;

  const std::shared_ptr<Core> core_;
  const uint64_t change_granularity_;  // see Upstream::ChangeGranularity
};

}  // namespace upstream_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_NBD_UPSTREAM_IMPL_H_
