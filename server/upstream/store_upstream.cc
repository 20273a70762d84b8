// server/upstream/store_upstream.cc — see store_upstream.h.
#include "server/upstream/store_upstream.h"

#include <algorithm>
#include <atomic>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "server/common/log.h"
#include "server/common/mutex.h"
#include "server/common/pending.h"

namespace blockmeta {
namespace {

// Stored answers are looked up for at most this many extents per call (an
// upstream without extended headers sends at most 2^20 per chunk).
constexpr size_t kMaxExtentsPerAnswer = size_t{1} << 20;

// Runs `done` with tls_answered_from_store == `from_store`, restoring the
// caller's value after (completions may run inline, nested).
void Complete(ExtentsCallback done, absl::StatusOr<ExtentList> got,
              bool from_store) {
  const bool saved = tls_answered_from_store;
  tls_answered_from_store = from_store;
  std::move(done)(std::move(got));
  tls_answered_from_store = saved;
}

// True when a and b give every byte of [start, min(ends)) the same flags.
bool SameOver(uint64_t start, const ExtentList& a, const ExtentList& b) {
  const uint64_t end = std::min(a.back().end(), b.back().end());
  size_t i = 0, j = 0;
  uint64_t pos = start;
  while (pos < end) {
    while (i < a.size() && a[i].end() <= pos) ++i;
    while (j < b.size() && b[j].end() <= pos) ++j;
    if (i == a.size() || j == b.size()) return false;
    if (a[i].offset > pos || b[j].offset > pos) return false;  // a gap
    if (a[i].flags != b[j].flags) return false;
    pos = std::min(a[i].end(), b[j].end());
  }
  return true;
}

// Well-formed for writing through: contiguous from `offset`, nonzero.
bool Contiguous(uint64_t offset, const ExtentList& x) {
  if (x.empty() || x.front().offset != offset) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i].length == 0 || (i > 0 && x[i].offset != x[i - 1].end())) {
      return false;
    }
  }
  return true;
}

}  // namespace

class StoreUpstream::State : public std::enable_shared_from_this<State> {
 public:
  State(std::weak_ptr<Upstream> inner, std::shared_ptr<ExtentStore> store,
        Options options)
      : inner_(std::move(inner)),
        store_(std::move(store)),
        options_(std::move(options)) {}

  void Serve(const std::string& context, uint64_t offset, uint64_t length,
             ExtentsCallback done);
  void Reset();  // the upstream reconnected: check again before serving
  // Starts the check of every context with persisted answers, once per
  // generation (cheap after the first call).
  void CheckEagerly();
  void Close() { store_->CloseIdentity(options_.identity); }
  void FillStats(UpstreamStats* out) const;
  const std::string& identity() const { return options_.identity; }

 private:
  enum class Phase { kUnchecked, kChecking, kChecked };
  struct Waiting {
    uint64_t offset, length;
    ExtentsCallback done;
  };
  struct Context {
    Phase phase = Phase::kUnchecked;
    uint64_t epoch = 0;  // bumped by Reset(): a check of an older one is void
    std::vector<Waiting> waiting;
    UpstreamStats::StoreContext counters;
  };
  struct Check {
    // Constant after StartCheck.
    std::string context;
    uint32_t slot = 0;
    uint64_t epoch = 0;
    sync::Mutex mu;
    size_t pending ABSL_GUARDED_BY(mu) = 0;
    bool mismatch ABSL_GUARDED_BY(mu) = false;
    bool failed ABSL_GUARDED_BY(mu) = false;  // upstream error: retry later
  };

  void Forward(const std::string& context, uint32_t slot, bool store_it,
               uint64_t offset, uint64_t length, ExtentsCallback done);
  void StartCheck(const std::string& context, uint32_t slot, uint64_t epoch);
  void OnWindow(const std::shared_ptr<Check>& check, uint64_t start,
                uint64_t end, absl::StatusOr<ExtentList> got);
  void FinishCheck(const std::shared_ptr<Check>& check);

  // Constant after construction.
  const std::weak_ptr<Upstream> inner_;
  const std::shared_ptr<ExtentStore> store_;
  const Options options_;

  std::atomic<bool> eager_started_{false};
  mutable sync::Mutex mu_;
  absl::flat_hash_map<std::string, Context> contexts_ ABSL_GUARDED_BY(mu_);
  uint64_t verify_failures_ ABSL_GUARDED_BY(mu_) = 0;
};

void StoreUpstream::State::Serve(const std::string& context, uint64_t offset,
                                 uint64_t length, ExtentsCallback done) {
  absl::StatusOr<uint32_t> slot = store_->Slot(options_.identity, context);
  if (!slot.ok()) {  // the store is off: a plain upstream
    Forward(context, 0, false, offset, length, std::move(done));
    return;
  }
  const bool persisted = store_->SlotRecords(*slot) > 0;
  bool check = false, queued = false;
  uint64_t epoch = 0;
  {
    sync::MutexLock lock(&mu_);
    Context& c = contexts_[context];
    if (c.phase == Phase::kUnchecked && !persisted) c.phase = Phase::kChecked;
    switch (c.phase) {
      case Phase::kUnchecked:
        c.phase = Phase::kChecking;
        check = true;
        epoch = c.epoch;
        [[fallthrough]];
      case Phase::kChecking:
        c.waiting.push_back({offset, length, std::move(done)});
        queued = true;
        break;
      case Phase::kChecked:
        break;
    }
  }
  if (check) StartCheck(context, *slot, epoch);
  if (queued) return;  // served when the check ends
  // `done` was moved above only when queued, and then we returned; clang-tidy
  // cannot follow `queued`, hence the NOLINTs on its two uses below.
  std::optional<ExtentList> hit =
      store_->Lookup(*slot, offset, length, kMaxExtentsPerAnswer);
  if (hit.has_value()) {
    {
      sync::MutexLock lock(&mu_);
      UpstreamStats::StoreContext& k = contexts_[context].counters;
      k.hits += 1;
      k.extents_read += hit->size();
    }
    // NOLINTNEXTLINE(bugprone-use-after-move): not queued, so not moved.
    Complete(std::move(done), *std::move(hit), /*from_store=*/true);
    return;
  }
  // NOLINTNEXTLINE(bugprone-use-after-move): not queued, so not moved.
  Forward(context, *slot, true, offset, length, std::move(done));
}

void StoreUpstream::State::CheckEagerly() {
  if (eager_started_.exchange(true)) return;
  for (const std::string& context : store_->Contexts(options_.identity)) {
    absl::StatusOr<uint32_t> slot = store_->Slot(options_.identity, context);
    if (!slot.ok() || store_->SlotRecords(*slot) == 0) continue;
    uint64_t epoch = 0;
    {
      sync::MutexLock lock(&mu_);
      Context& c = contexts_[context];
      if (c.phase != Phase::kUnchecked) continue;
      c.phase = Phase::kChecking;
      epoch = c.epoch;
    }
    StartCheck(context, *slot, epoch);
  }
}

void StoreUpstream::State::Forward(const std::string& context, uint32_t slot,
                                   bool store_it, uint64_t offset,
                                   uint64_t length, ExtentsCallback done) {
  {
    sync::MutexLock lock(&mu_);
    contexts_[context].counters.misses += 1;
  }
  std::shared_ptr<Upstream> inner = inner_.lock();
  if (inner == nullptr) {
    Complete(std::move(done), absl::UnavailableError("the export is gone"),
             false);
    return;
  }
  inner->AsyncBlockStatus(
      context, offset, length,
      [self = shared_from_this(), context, slot, store_it, offset,
       done = std::move(done)](absl::StatusOr<ExtentList> got) mutable {
        // Written through before the caller sees it, and only an answer the
        // upstream gave (an error stores nothing).
        if (store_it && got.ok() && Contiguous(offset, *got) &&
            self->store_->Write(slot, *got).ok()) {
          sync::MutexLock lock(&self->mu_);
          self->contexts_[context].counters.writes += 1;
        }
        Complete(std::move(done), std::move(got), false);
      });
}

void StoreUpstream::State::StartCheck(const std::string& context, uint32_t slot,
                                      uint64_t epoch) {
  auto check = std::make_shared<Check>();
  check->context = context;
  check->slot = slot;
  check->epoch = epoch;
  std::vector<std::pair<uint64_t, uint64_t>> windows = store_->SampleWindows(
      slot, std::max<uint32_t>(1, options_.verify_windows));
  std::shared_ptr<Upstream> inner = inner_.lock();
  if (windows.empty() || inner == nullptr) {
    {
      sync::MutexLock lock(&check->mu);
      check->failed = inner == nullptr;
    }
    FinishCheck(check);
    return;
  }
  {
    sync::MutexLock lock(&check->mu);
    check->pending = windows.size();
  }
  {
    sync::MutexLock lock(&mu_);
    contexts_[context].counters.verify_calls += windows.size();
  }
  for (const auto& [start, end] : windows) {
    inner->AsyncBlockStatus(context, start, end - start,
                            [self = shared_from_this(), check, start = start,
                             end = end](absl::StatusOr<ExtentList> got) {
                              self->OnWindow(check, start, end, std::move(got));
                            });
  }
}

void StoreUpstream::State::OnWindow(const std::shared_ptr<Check>& check,
                                    uint64_t start, uint64_t end,
                                    absl::StatusOr<ExtentList> got) {
  bool mismatch = false, failed = false;
  if (!got.ok()) {
    // The upstream no longer covers the window: other content.
    mismatch = got.status().code() == absl::StatusCode::kOutOfRange ||
               got.status().code() == absl::StatusCode::kInvalidArgument;
    failed = !mismatch;
  } else {
    std::optional<ExtentList> stored =
        store_->Lookup(check->slot, start, end - start, kMaxExtentsPerAnswer);
    // Compared over the range both cover (an upstream may answer less than
    // asked); a window discarded meanwhile has nothing to compare.
    mismatch = stored.has_value() &&
               (!Contiguous(start, *got) || !SameOver(start, *stored, *got));
  }
  bool last = false;
  {
    sync::MutexLock lock(&check->mu);
    check->mismatch = check->mismatch || mismatch;
    check->failed = check->failed || failed;
    last = --check->pending == 0;
  }
  if (last) FinishCheck(check);
}

void StoreUpstream::State::FinishCheck(const std::shared_ptr<Check>& check) {
  bool mismatch = false, failed = false;
  {
    sync::MutexLock lock(&check->mu);
    mismatch = check->mismatch;
    failed = check->failed;
  }
  if (mismatch) {
    LogError("store_verify_failed",
             {{"export", options_.export_name},
              {"identity", options_.identity},
              {"context", check->context},
              {"action", "discarded every persisted answer of the identity"}});
    store_->DiscardIdentity(options_.identity);
  }
  std::vector<Waiting> waiting;
  {
    sync::MutexLock lock(&mu_);
    if (mismatch) verify_failures_ += 1;
    Context& c = contexts_[check->context];
    if (c.epoch == check->epoch) {
      // A failed check leaves the context to be checked by the next call.
      c.phase = failed ? Phase::kUnchecked : Phase::kChecked;
      if (failed) eager_started_.store(false);  // and by the next Ready()
      waiting.swap(c.waiting);
    }
  }
  for (Waiting& w : waiting) {
    if (failed) {
      absl::StatusOr<uint32_t> slot =
          store_->Slot(options_.identity, check->context);
      Forward(check->context, slot.ok() ? *slot : 0, slot.ok(), w.offset,
              w.length, std::move(w.done));
    } else {
      Serve(check->context, w.offset, w.length, std::move(w.done));
    }
  }
}

void StoreUpstream::State::Reset() {
  std::vector<std::pair<std::string, Waiting>> waiting;
  eager_started_.store(false);
  {
    sync::MutexLock lock(&mu_);
    for (auto& [name, c] : contexts_) {
      c.epoch += 1;
      c.phase = Phase::kUnchecked;
      for (Waiting& w : c.waiting) waiting.emplace_back(name, std::move(w));
      c.waiting.clear();
    }
  }
  // Calls that waited for a check of the old generation start over.
  for (auto& [name, w] : waiting) {
    Serve(name, w.offset, w.length, std::move(w.done));
  }
}

void StoreUpstream::State::FillStats(UpstreamStats* out) const {
  out->store_identity = options_.identity;
  out->store_bytes = store_->IdentityBytes(options_.identity);
  sync::MutexLock lock(&mu_);
  out->store_verify_failures = verify_failures_;
  for (const auto& [name, c] : contexts_)
    out->store_contexts[name] = c.counters;
}

StoreUpstream::StoreUpstream(std::unique_ptr<Upstream> inner,
                             std::shared_ptr<ExtentStore> store,
                             Options options)
    : inner_(std::move(inner)) {
  store->OpenIdentity(options.export_name, options.identity);
  state_ =
      std::make_shared<State>(inner_, std::move(store), std::move(options));
}

StoreUpstream::~StoreUpstream() {
  // The inner upstream goes first (its last completions run meanwhile,
  // holding the State); then the identity may be evicted again.
  inner_.reset();
  state_->Close();
}

bool StoreUpstream::Ready() const {
  const bool ready = inner_->Ready();
  if (ready) state_->CheckEagerly();
  return ready;
}

absl::StatusOr<UpstreamInfo> StoreUpstream::Info() const {
  absl::StatusOr<UpstreamInfo> info = inner_->Info();
  if (info.ok()) info->read_only = true;
  return info;
}

void StoreUpstream::SetOnGenerationChange(std::function<void()> fn) {
  inner_->SetOnGenerationChange(
      [state = std::weak_ptr<State>(state_), fn = std::move(fn)] {
        if (std::shared_ptr<State> s = state.lock()) s->Reset();
        if (fn) fn();
      });
}

UpstreamStats StoreUpstream::Stats() const {
  UpstreamStats s = inner_->Stats();
  state_->FillStats(&s);
  return s;
}

absl::StatusOr<ExtentList> StoreUpstream::BlockStatus(
    const std::string& context, uint64_t offset, uint64_t length,
    absl::Time deadline) {
  // The answer, and whether the store gave it (read on the completion's
  // thread, where tls_answered_from_store is set).
  using Answer = std::pair<absl::StatusOr<ExtentList>, bool>;
  auto pending = std::make_shared<Pending<Answer>>();
  state_->Serve(context, offset, length,
                [pending](absl::StatusOr<ExtentList> got) {
                  pending->Set(Answer(std::move(got), tls_answered_from_store));
                });
  std::optional<Answer> r = pending->Wait(deadline);
  if (!r.has_value()) {
    tls_answered_from_store = false;
    return absl::DeadlineExceededError(
        "block status did not complete before the caller's deadline");
  }
  tls_answered_from_store = r->second;
  return std::move(r->first);
}

void StoreUpstream::AsyncBlockStatus(const std::string& context,
                                     uint64_t offset, uint64_t length,
                                     ExtentsCallback done) {
  state_->Serve(context, offset, length, std::move(done));
}

}  // namespace blockmeta
