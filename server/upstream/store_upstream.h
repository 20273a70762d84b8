// server/upstream/store_upstream.h — an Upstream decorator that puts the
// persistent store (server/store) behind an immutable export's upstream.
//
// BlockStatus / AsyncBlockStatus answer from the store when a stored record
// contains the asked offset (the answer runs contiguously from there, as far
// as the stored records do, and may be shorter than asked, as an upstream's
// may); otherwise they ask the real upstream and write its answer through,
// in one batch, before the caller sees it. The cache and the NBD shim use
// it unchanged: an extent evicted from memory is then read back from disk,
// and a restarted blockmetad starts warm.
//
// Verification: when a context's slot holds persisted answers, they are
// checked before any is served: `verify_windows` stored windows are asked
// of the upstream and compared. The check starts as soon as the upstream is
// first seen ready (Ready(), which the server's health loop polls every
// 500 ms, so a restarted server checks before its first caller) or at the
// first block-status call of the context, whichever comes first; calls
// arriving meanwhile wait for it. A reconnect to a new generation checks
// again. Any difference (or an upstream that no
// longer covers a window) discards every answer of the identity, with an
// error-level log line ("store_verify_failed") and a counter; the waiting
// calls then go to the upstream. An upstream error during the check (not
// connected yet) leaves the context unchecked: the waiting calls go to the
// upstream and the next call checks again.
//
// Data commands pass through; writes (Pwrite/Trim/Zero) are refused with
// PERMISSION_DENIED: the export is immutable.
//
// Counters (Stats().store_*): hits never reach the upstream, and only the
// upstream's own calls (misses and verification) count as upstream calls.
// tls_answered_from_store (upstream.h) marks completions answered from disk.
//
// Lifetime: the decorator owns the inner upstream; completions and the
// generation hook hold the shared State, never the decorator.
// Thread-safety: all methods are thread-safe; State::mu is never held
// across store I/O, an upstream call or a completion.
#ifndef BLOCKMETA_SERVER_UPSTREAM_STORE_UPSTREAM_H_
#define BLOCKMETA_SERVER_UPSTREAM_STORE_UPSTREAM_H_

#include <memory>
#include <string>

#include "server/store/extent_store.h"
#include "server/upstream/upstream.h"

namespace blockmeta {

class StoreUpstream final : public Upstream {
 public:
  struct Options {
    std::string export_name;
    std::string identity;  // server/store/content_identity.h
    uint32_t verify_windows = 1;
  };

  StoreUpstream(std::unique_ptr<Upstream> inner,
                std::shared_ptr<ExtentStore> store, Options options);
  ~StoreUpstream() override;

  // Also starts the reopen checks the first time the upstream is ready.
  bool Ready() const override;
  bool WaitReady(absl::Time deadline) override {
    return inner_->WaitReady(deadline);
  }
  absl::StatusOr<UpstreamInfo> Info() const override;
  uint64_t ChangeGranularity() const override {
    return inner_->ChangeGranularity();
  }
  std::string LastError() const override { return inner_->LastError(); }
  uint64_t Generation() const override { return inner_->Generation(); }
  void SetOnGenerationChange(std::function<void()> fn) override;
  UpstreamStats Stats() const override;
  // Removal closes the real upstream (its commands in flight fail at once);
  // the store keeps what it holds for the next export of this identity.
  void Close(const absl::Status& why) override { inner_->Close(why); }

  absl::StatusOr<ExtentList> BlockStatus(const std::string& context,
                                         uint64_t offset, uint64_t length,
                                         absl::Time deadline) override;
  void AsyncBlockStatus(const std::string& context, uint64_t offset,
                        uint64_t length, ExtentsCallback done) override;

  absl::Status Pread(void* buf, uint64_t count, uint64_t offset,
                     absl::Time deadline) override {
    return inner_->Pread(buf, count, offset, deadline);
  }
  absl::Status Pwrite(const void*, uint64_t, uint64_t, uint32_t,
                      absl::Time) override {
    return Immutable();
  }
  absl::Status Trim(uint64_t, uint64_t, uint32_t, absl::Time) override {
    return Immutable();
  }
  absl::Status Zero(uint64_t, uint64_t, uint32_t, absl::Time) override {
    return Immutable();
  }
  absl::Status Flush(absl::Time deadline) override {
    return inner_->Flush(deadline);
  }
  absl::Status Cache(uint64_t count, uint64_t offset,
                     absl::Time deadline) override {
    return inner_->Cache(count, offset, deadline);
  }
  void AsyncPread(void* buf, uint64_t count, uint64_t offset,
                  StatusCallback done) override {
    inner_->AsyncPread(buf, count, offset, std::move(done));
  }
  void AsyncPwrite(const void*, uint64_t, uint64_t, uint32_t,
                   StatusCallback done) override {
    std::move(done)(Immutable());
  }
  void AsyncTrim(uint64_t, uint64_t, uint32_t, StatusCallback done) override {
    std::move(done)(Immutable());
  }
  void AsyncZero(uint64_t, uint64_t, uint32_t, StatusCallback done) override {
    std::move(done)(Immutable());
  }
  void AsyncFlush(StatusCallback done) override {
    inner_->AsyncFlush(std::move(done));
  }
  void AsyncCache(uint64_t count, uint64_t offset,
                  StatusCallback done) override {
    inner_->AsyncCache(count, offset, std::move(done));
  }

  class State;  // shared with completions (store_upstream.cc)

 private:
  static absl::Status Immutable() {
    return absl::PermissionDeniedError("the export is immutable (read-only)");
  }

  // Constant after construction.
  std::shared_ptr<Upstream> inner_;
  std::shared_ptr<State> state_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_UPSTREAM_STORE_UPSTREAM_H_
