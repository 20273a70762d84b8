// server/upstream/nbd_upstream.cc — see nbd_upstream.h.
//
// Layout: Op (one NBD command in flight and its completion), Conn (one
// libnbd handle: handshake, commands, health; driven by the NbdEngine),
// Core (one upstream's pool, generations, reconnects; shared with timer
// tasks by weak reference) and NbdUpstream (the Upstream facade: range
// checks, chunking, synchronous waits).
#include "server/upstream/nbd_upstream.h"

#include <errno.h>
#include <libnbd.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/common/log.h"
#include "server/common/mutex.h"
#include "server/upstream/chunked.h"
#include "server/upstream/image_probe.h"
#include "server/upstream/nbd_engine.h"
#include "server/upstream/nbd_errors.h"
#include "server/upstream/nbd_handshake.h"
#include "server/upstream/spawned_server.h"

namespace blockmeta {
namespace {

constexpr absl::Duration kMinBackoff = absl::Milliseconds(100);
constexpr absl::Duration kMaxBackoff = absl::Seconds(5);
// An idle handle gets a small read after this long without traffic: a
// server that shuts down does not always close idle connections (nbdkit
// 1.32 may keep them open and answer ESHUTDOWN), so silence proves nothing.
constexpr absl::Duration kProbeIdle = absl::Milliseconds(700);
// How long a soft disconnect may take before the handle is just closed.
constexpr absl::Duration kDrainLimit = absl::Seconds(1);
// Largest block status request: the 32-bit limit rounded down to 1 MiB.
// Exactly 2^32 - 1 makes nbdkit 1.32 abort (assertion in
// extents_to_block_descriptors); an aligned size also suits every server.
constexpr uint64_t kMaxBlockStatusRequest =
    kMaxNbdRequestLength / (1u << 20) * (1u << 20);
// Trim/zero/cache lengths are 32-bit in NBD without extended headers.
constexpr uint64_t kMaxEffectLength = uint64_t{1} << 31;

class Conn;
class Core;

// --- Op: one command in flight ---------------------------------------------
//
// libnbd calls the completion callback (at most once) and then the free
// callback (exactly once: after the reply, after the connection died, when
// the issue itself failed, or in nbd_close). The free callback computes the
// outcome and queues the Op on the current thread's finished list; the
// thread that made the libnbd call then runs the Op's Finish outside every
// libnbd lock (RunFinished), so a completion may issue further commands.
struct Op {
  virtual ~Op() = default;
  virtual void Finish(absl::Status outcome) = 0;

  const char* what = "";
  Conn* conn = nullptr;
  absl::Time issued;
  std::list<Op*>::iterator pos;  // in conn->inflight_
  bool completed = false;        // libnbd's completion callback ran
  int error = 0;                 // its *error
  bool probe = false;            // a health probe, not a caller's command
  absl::Status outcome;
};

struct StatusOp : Op {
  StatusCallback done;
  void Finish(absl::Status s) override { std::move(done)(std::move(s)); }
};

// A small read on an idle handle: a server that is shutting down answers
// ESHUTDOWN (Retire notices), one that hangs exceeds the timeout.
struct ProbeOp : Op {
  std::vector<char> buf;
  void Finish(absl::Status) override {}
};

// Collects the block status chunk of one context, then validates it.
struct ExtentsOp : Op {
  std::string name;  // export, for messages
  std::string context;
  uint64_t offset = 0;
  uint64_t size = 0;  // export size, to clip
  int chunks = 0;
  std::vector<uint32_t> entries;
  std::string malformed;
  ExtentsCallback done;

  void Finish(absl::Status s) override {
    if (!s.ok()) {
      std::move(done)(std::move(s));
      return;
    }
    std::move(done)(Parse());
  }
  absl::StatusOr<ExtentList> Parse() const {
    auto bad = [&](absl::string_view why) {
      return absl::InternalError(
          absl::StrCat("export ", name,
                       ": upstream sent a malformed block status reply for ",
                       context, " at ", offset, ": ", why));
    };
    if (!malformed.empty()) return bad(malformed);
    if (chunks == 0 || entries.empty())
      return bad("no extents for the context");
    ExtentList out;
    out.reserve(entries.size() / 2);
    uint64_t cursor = offset;
    for (size_t i = 0; i + 1 < entries.size(); i += 2) {
      const uint64_t len = entries[i];
      if (len == 0) return bad(absl::StrCat("zero-length extent #", i / 2));
      if (cursor >= size) break;  // past the end: ignore the rest
      const uint64_t clipped = std::min(len, size - cursor);
      out.push_back(Extent{cursor, clipped, entries[i + 1]});
      cursor += clipped;
    }
    return out;
  }
  static int OnChunk(void* user_data, const char* metacontext,
                     uint64_t chunk_offset, uint32_t* words, size_t nr_words,
                     int* error) {
    auto* op = static_cast<ExtentsOp*>(user_data);
    if (op->context != metacontext) return 0;
    if (++op->chunks > 1) {
      op->malformed = "more than one block status chunk for the context";
    } else if (chunk_offset != op->offset) {
      op->malformed = absl::StrCat("chunk for offset ", chunk_offset,
                                   ", asked ", op->offset);
    } else if (nr_words % 2 != 0) {
      op->malformed = "odd number of extent words";
    } else {
      op->entries.assign(words, words + nr_words);
    }
    return 0;
  }
};

std::vector<Op*>& FinishedOps() {
  thread_local std::vector<Op*> finished;
  return finished;
}
// The Op whose nbd_aio_* call is running on this thread.
thread_local Op* tls_issuing = nullptr;

// Runs every Op finished on this thread (outside libnbd locks).
void RunFinished() {
  std::vector<Op*>& q = FinishedOps();
  while (!q.empty()) {
    std::vector<Op*> batch;
    batch.swap(q);
    for (Op* op : batch) {
      op->Finish(std::move(op->outcome));
      delete op;
    }
  }
}

// The reason a connection was closed, for its unanswered commands.
struct CloseReason {
  CloseReason() = default;
  explicit CloseReason(absl::Status s) : status(std::move(s)) {}
  absl::Status status;
  // Commands issued at or before this time exceeded upstream_timeout_ms.
  absl::Time timed_out_before = absl::InfinitePast();
  absl::Duration timeout;
};

// Counters shared by a Core and its Conns.
struct Counters {
  std::atomic<uint64_t> issued{0};
  std::atomic<uint64_t> in_flight{0};
  std::atomic<uint64_t> failed{0};
  std::atomic<uint64_t> timed_out{0};
  std::atomic<uint64_t> caller_deadlines{0};
  std::atomic<uint64_t> probes{0};
};

// --- Conn: one libnbd handle -------------------------------------------------
class Conn : public NbdDriven {
 public:
  Conn(std::shared_ptr<Core> core, nbd_handle* h,
       absl::Time handshake_deadline);
  ~Conn() override;

  nbd_handle* handle() const override { return h_; }
  void OnEvents(absl::string_view notify_error) override;
  void OnTick(absl::Time now) override;

  // Sends one command: `call` makes the nbd_aio_* call with the given
  // completion and returns its cookie (-1 on failure).
  void Issue(
      Op* op,
      absl::FunctionRef<int64_t(nbd_handle*, nbd_completion_callback)> call);

  uint64_t in_flight() const { return in_flight_.load(); }
  UpstreamStats::Connection Stats() const {
    return {issued_.load(), in_flight_.load(), max_in_flight_.load()};
  }

 private:
  enum class Phase { kHandshaking, kReady, kDraining, kClosing };
  static int OnComplete(void* user_data, int* error);
  static void OnFree(void* user_data);
  void Retire(Op* op);
  void Advance(absl::string_view notify_error);
  void TickPhase(absl::Time now);
  void Probe();
  void StartDrain();
  // Closes for good: the Core forgets it, the engine stops driving it; the
  // handle is closed when the last reference goes (~Conn).
  void Close(const CloseReason& why, bool lost);
  absl::Status LostStatus(absl::string_view notify_error) const;

  // Shared: a Conn being closed on a driver thread may outlive the
  // NbdUpstream facade by a callback's length.
  const std::shared_ptr<Core> core_;
  nbd_handle* const h_;
  const absl::Time handshake_deadline_;
  std::atomic<bool> saw_shutdown_{false};  // a reply said ESHUTDOWN
  std::atomic<uint64_t> issued_{0};
  std::atomic<uint64_t> in_flight_{0};
  std::atomic<uint64_t> max_in_flight_{0};
  std::atomic<int64_t> last_activity_{0};  // unix ns of the last issue/reply

  // Driver callbacks only (the engine runs them one at a time).
  Handshake handshake_;
  Phase phase_ = Phase::kHandshaking;
  absl::Time drain_deadline_;

  sync::Mutex mu_;  // taken inside libnbd callbacks: never call nbd_* under it
  std::list<Op*> inflight_ ABSL_GUARDED_BY(mu_);  // in issue order
  CloseReason close_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
};

// --- Core: one upstream's pool ----------------------------------------------
class Core : public std::enable_shared_from_this<Core> {
 public:
  Core(const blockmeta::v1::ExportConfig& config,
       std::unique_ptr<SpawnedServer> server, NbdEngine& engine);

  void Start() { ScheduleAttempt(absl::Now()); }
  void Shutdown();

  // Facade queries.
  bool Ready() const {
    sync::MutexLock lock(&mu_);
    return !live_.empty();
  }
  bool WaitReady(absl::Time deadline) {
    sync::MutexLock lock(&mu_);
    while (live_.empty() && !stopped_) {
      if (mu_.WaitWithDeadline(&cv_, deadline)) break;
    }
    return !live_.empty();
  }
  absl::StatusOr<UpstreamInfo> Info() const {
    sync::MutexLock lock(&mu_);
    if (!have_info_) return NotReadyLocked();
    return info_;
  }
  absl::StatusOr<UpstreamInfo> ConnectedInfo() const {
    sync::MutexLock lock(&mu_);
    if (live_.empty() || !have_info_) return NotReadyLocked();
    return info_;
  }
  std::string LastError() const {
    sync::MutexLock lock(&mu_);
    return live_.empty() ? last_error_ : "";
  }
  uint64_t Generation() const {
    sync::MutexLock lock(&mu_);
    return generation_;
  }
  void SetOnGenerationChange(std::function<void()> fn) {
    sync::MutexLock lock(&mu_);
    on_generation_change_ = std::move(fn);
  }
  int LiveConnections() const {
    sync::MutexLock lock(&mu_);
    return static_cast<int>(live_.size());
  }
  UpstreamStats Stats() const;
  pid_t ServerPid() const { return server_ != nullptr ? server_->pid() : -1; }
  std::string ServerSocket() const {
    return server_ != nullptr ? server_->socket_path() : "";
  }

  // The least busy live connection; null when none is up.
  std::shared_ptr<Conn> Pick();
  absl::Status NotReady() const {
    sync::MutexLock lock(&mu_);
    return NotReadyLocked();
  }

  // From Conn callbacks (driver threads). True: keep it; false: close it.
  bool OnHandshakeDone(Conn* c, UpstreamInfo info);
  void OnHandshakeFailed(Conn* c, const absl::Status& why);
  void OnDraining(Conn* c);
  // Forgets `c`; returns the Core's reference (to be dropped unlocked).
  std::shared_ptr<Conn> Forget(Conn* c, bool lost, const absl::Status& why);

  const std::string& name() const { return name_; }
  absl::Duration timeout() const { return timeout_; }
  NbdEngine& engine() { return engine_; }
  Counters& counters() { return counters_; }
  // The server's exit, when a spawned server is not running ("" else).
  std::string ServerExit() {
    if (server_ == nullptr || server_->Running()) return "";
    return server_->ExitDescription();
  }

 private:
  absl::Status NotReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    mu_.AssertHeld();
    return absl::UnavailableError(
        absl::StrCat("export ", name_, ": upstream not connected",
                     last_error_.empty() ? "" : ": ", last_error_));
  }
  void ScheduleAttempt(absl::Time when);
  void ScheduleAttemptLocked(absl::Time when)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RetryLaterLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void GenerationChangedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Timer thread: restarts a dead spawned server, starts missing handshakes.
  void Attempt();
  void NotifyGenerationChange();
  bool Wanted(const std::vector<std::shared_ptr<Conn>>& list, Conn* c) const;

  // Constant after construction.
  const std::string name_;
  const std::string uri_;  // for nbd_uri upstreams
  const int max_connections_;
  const absl::Duration timeout_;
  const bool force_read_only_;
  const std::unique_ptr<SpawnedServer> server_;  // internally synchronized
  NbdEngine& engine_;
  Counters counters_;

  mutable sync::Mutex mu_;
  absl::CondVar cv_;  // signalled when live_ changes or on stop
  std::vector<std::shared_ptr<Conn>> live_ ABSL_GUARDED_BY(mu_);
  // Handshaking or draining: driven, not used for commands.
  std::vector<std::shared_ptr<Conn>> others_ ABSL_GUARDED_BY(mu_);
  int connecting_ ABSL_GUARDED_BY(mu_) = 0;
  int target_ ABSL_GUARDED_BY(mu_) = 1;  // handles wanted (multi-conn)
  bool have_info_ ABSL_GUARDED_BY(mu_) = false;
  UpstreamInfo info_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_) = "connecting";
  // What the spawned server said when it last exited (kept in errors until
  // a connection succeeds: a restarted server that fails again may reset
  // the socket before its own exit is seen).
  std::string last_exit_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t notified_generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool notify_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  bool round_bumped_ ABSL_GUARDED_BY(mu_) = false;  // this round's bump done
  bool ever_connected_ ABSL_GUARDED_BY(mu_) = false;
  bool attempt_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time attempt_at_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_) = kMinBackoff;
  // (std:: rather than absl::BitGen: Debian's absl random pool is not
  // TSan-instrumented and reports false races.)
  std::minstd_rand rng_ ABSL_GUARDED_BY(mu_){std::random_device{}()};
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t reconnects_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t lost_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t soft_disconnects_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<void()> on_generation_change_ ABSL_GUARDED_BY(mu_);
};

// --- Conn implementation
// ------------------------------------------------------

Conn::Conn(std::shared_ptr<Core> core, nbd_handle* h,
           absl::Time handshake_deadline)
    : core_(std::move(core)),
      h_(h),
      handshake_deadline_(handshake_deadline),
      handshake_(h) {}

Conn::~Conn() {
  {
    sync::MutexLock lock(&mu_);
    closing_ = true;
    if (close_.status.ok()) {
      close_.status = absl::UnavailableError(absl::StrCat(
          "export ", core_->name(), ": upstream connection closed"));
    }
  }
  nbd_close(h_);  // frees (retires) every command still in flight
  RunFinished();
}

int Conn::OnComplete(void* user_data, int* error) {
  auto* op = static_cast<Op*>(user_data);
  op->completed = true;
  op->error = *error;
  return 1;  // retire automatically
}

void Conn::OnFree(void* user_data) {
  auto* op = static_cast<Op*>(user_data);
  op->conn->Retire(op);
  FinishedOps().push_back(op);
}

void Conn::Retire(Op* op) {
  Counters& n = core_->counters();
  if (!op->probe) n.in_flight.fetch_sub(1);
  in_flight_.fetch_sub(1);
  last_activity_.store(absl::ToUnixNanos(absl::Now()));
  const std::string& name = core_->name();
  sync::MutexLock lock(&mu_);
  inflight_.erase(op->pos);
  if (op->completed && op->error == 0) {
    op->outcome = absl::OkStatus();
    return;
  }
  if (!op->probe) n.failed.fetch_add(1);
  if (op->completed && op->error == ESHUTDOWN) {
    // NBD: the server is shutting down; the client must disconnect softly.
    saw_shutdown_.store(true);
    op->outcome = absl::UnavailableError(
        absl::StrCat("export ", name, ": upstream ", op->what,
                     ": server is shutting down (ESHUTDOWN)"));
    op->outcome = WithNbdError(std::move(op->outcome), kNbdEshutdown);
  } else if (op->completed && !closing_ && op->error != ENOTCONN) {
    // The server refused this command; the connection is fine.
    op->outcome = StatusFromErrno(
        op->error, absl::StrCat("export ", name, ": upstream ", op->what), "");
  } else if (tls_issuing == op && !op->completed) {
    op->outcome = absl::UnavailableError("");  // set by Issue (per-thread)
  } else if (closing_ && op->issued <= close_.timed_out_before) {
    n.timed_out.fetch_add(1);
    op->outcome = absl::DeadlineExceededError(absl::StrCat(
        "export ", name, ": upstream ", op->what, " did not answer within ",
        absl::FormatDuration(close_.timeout),
        " (upstream_timeout_ms; connection closed)"));
  } else if (closing_) {
    op->outcome = close_.status;
  } else {
    op->outcome = absl::UnavailableError(absl::StrCat(
        "export ", name, ": upstream connection lost during ", op->what));
  }
}

void Conn::Issue(
    Op* op,
    absl::FunctionRef<int64_t(nbd_handle*, nbd_completion_callback)> call) {
  op->conn = this;
  op->issued = absl::Now();
  Counters& n = core_->counters();
  if (op->probe) {
    n.probes.fetch_add(1);
  } else {
    n.issued.fetch_add(1);
    n.in_flight.fetch_add(1);
    issued_.fetch_add(1);
  }
  last_activity_.store(absl::ToUnixNanos(op->issued));
  const uint64_t now_in = in_flight_.fetch_add(1) + 1;
  uint64_t seen = max_in_flight_.load();
  while (now_in > seen && !max_in_flight_.compare_exchange_weak(seen, now_in)) {
  }
  {
    sync::MutexLock lock(&mu_);
    inflight_.push_back(op);
    op->pos = std::prev(inflight_.end());
  }
  tls_issuing = op;
  const int64_t cookie =
      call(h_, nbd_completion_callback{OnComplete, op, OnFree});
  tls_issuing = nullptr;
  if (cookie == -1) {
    // libnbd already freed (queued) the op on this thread; its error is
    // this thread's.
    absl::Status s = StatusFromNbdError(op->what);
    op->outcome = absl::UnavailableError(
        absl::StrCat("export ", core_->name(), ": upstream ", s.message()));
  } else {
    core_->engine().Rearm(this);
  }
  RunFinished();
}

absl::Status Conn::LostStatus(absl::string_view notify_error) const {
  std::string why =
      absl::StrCat("export ", core_->name(), ": upstream connection lost");
  if (!notify_error.empty()) absl::StrAppend(&why, ": ", notify_error);
  const std::string exit = core_->ServerExit();
  if (!exit.empty()) {
    why = absl::StrCat("export ", core_->name(), ": upstream server ", exit);
  }
  return absl::UnavailableError(why);
}

void Conn::OnEvents(absl::string_view notify_error) {
  Advance(notify_error);
  RunFinished();  // what the notify just answered, outside libnbd's lock
}

void Conn::OnTick(absl::Time now) {
  TickPhase(now);
  RunFinished();
}

void Conn::TickPhase(absl::Time now) {
  switch (phase_) {
    case Phase::kHandshaking:
      core_->engine().Refresh(this);
      if (now > handshake_deadline_) {
        phase_ = Phase::kClosing;
        absl::Status why = absl::DeadlineExceededError(absl::StrCat(
            "export ", core_->name(), ": connect: handshake timed out"));
        core_->OnHandshakeFailed(this, why);
        Close(CloseReason(why), false);
        return;
      }
      break;
    case Phase::kReady: {
      absl::Time oldest = absl::InfiniteFuture();
      {
        sync::MutexLock lock(&mu_);
        if (!inflight_.empty()) oldest = inflight_.front()->issued;
      }
      if (oldest == absl::InfiniteFuture() &&
          now - absl::FromUnixNanos(last_activity_.load()) > kProbeIdle &&
          handshake_.info().size > 0) {
        Probe();
        return;
      }
      if (now - oldest > core_->timeout()) {
        // The upstream exceeded its own timeout: libnbd cannot cancel one
        // command, so the connection goes (and is reconnected).
        CloseReason why;
        why.status = absl::UnavailableError(
            absl::StrCat("export ", core_->name(),
                         ": upstream connection closed: a command exceeded "
                         "upstream_timeout_ms"));
        why.timed_out_before = now - core_->timeout();
        why.timeout = core_->timeout();
        phase_ = Phase::kClosing;
        Close(why, true);
        return;
      }
      break;
    }
    case Phase::kDraining:
      if (now > drain_deadline_) {
        phase_ = Phase::kClosing;
        Close(CloseReason(absl::UnavailableError(
                  absl::StrCat("export ", core_->name(),
                               ": upstream is shutting down (ESHUTDOWN)"))),
              false);
        return;
      }
      break;
    case Phase::kClosing:
      return;
  }
  Advance("");
}

void Conn::Advance(absl::string_view notify_error) {
  switch (phase_) {
    case Phase::kHandshaking: {
      core_->engine().Refresh(this);
      absl::StatusOr<bool> r = handshake_.Advance(notify_error);
      if (!r.ok()) {
        phase_ = Phase::kClosing;
        absl::Status why(r.status().code(),
                         absl::StrCat("export ", core_->name(),
                                      ": connect: ", r.status().message()));
        core_->OnHandshakeFailed(this, why);
        Close(CloseReason(why), false);
        return;
      }
      if (!*r) return;
      phase_ = Phase::kReady;
      last_activity_.store(absl::ToUnixNanos(absl::Now()));
      if (!core_->OnHandshakeDone(this, handshake_.info())) {
        phase_ = Phase::kClosing;
        Close(CloseReason(absl::UnavailableError("connection not needed")),
              false);
      }
      return;
    }
    case Phase::kReady:
      if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
        phase_ = Phase::kClosing;
        Close(CloseReason(LostStatus(notify_error)), true);
        return;
      }
      if (saw_shutdown_.load()) StartDrain();
      return;
    case Phase::kDraining:
      if (nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1) {
        phase_ = Phase::kClosing;
        Close(CloseReason(absl::UnavailableError(
                  absl::StrCat("export ", core_->name(),
                               ": upstream is shutting down (ESHUTDOWN)"))),
              false);
      }
      return;
    case Phase::kClosing:
      return;
  }
}

void Conn::Probe() {
  auto* op = new ProbeOp;
  op->what = "health probe";
  op->probe = true;
  const uint64_t n = std::min<uint64_t>(
      std::max<uint32_t>(handshake_.info().minimum_block_size, 1),
      handshake_.info().size);
  op->buf.resize(n);
  char* buf = op->buf.data();
  Issue(op, [&](nbd_handle* h, nbd_completion_callback cb) {
    return nbd_aio_pread(h, buf, n, 0, cb, 0);
  });
}

void Conn::StartDrain() {
  // NBD (doc/proto.md, "Terminating the transmission phase"): a client that
  // gets ESHUTDOWN must initiate a soft disconnect (NBD_CMD_DISC); the server
  // answers what is in flight, then closes. A proxy that kept the handle
  // open would hold the server up forever.
  core_->OnDraining(this);
  phase_ = Phase::kDraining;
  drain_deadline_ = absl::Now() + kDrainLimit;
  if (nbd_aio_disconnect(h_, 0) == -1) {
    phase_ = Phase::kClosing;
    Close(CloseReason(absl::UnavailableError(
              absl::StrCat("export ", core_->name(),
                           ": upstream is shutting down (ESHUTDOWN)"))),
          false);
  }
}

void Conn::Close(const CloseReason& why, bool lost) {
  {
    sync::MutexLock lock(&mu_);
    close_ = why;
    closing_ = true;
  }
  std::shared_ptr<Conn> ref = core_->Forget(this, lost, why.status);
  core_->engine().Unwatch(this);
  // `ref` drops here; the engine's caller still holds one until this
  // callback returns, then ~Conn closes the handle.
}

// --- Core implementation
// -------------------------------------------------------

Core::Core(const blockmeta::v1::ExportConfig& config,
           std::unique_ptr<SpawnedServer> server, NbdEngine& engine)
    : name_(config.name()),
      uri_(config.upstream_case() == blockmeta::v1::ExportConfig::kNbdUri
               ? config.nbd_uri()
               : ""),
      max_connections_(config.connections() != 0 ? config.connections()
                                                 : kDefaultUpstreamConnections),
      timeout_(UpstreamTimeout(config)),
      force_read_only_(config.read_only() ||
                       (config.has_image() && config.image().read_only())),
      server_(std::move(server)),
      engine_(engine) {}

void Core::Shutdown() {
  std::vector<std::shared_ptr<Conn>> all;
  {
    sync::MutexLock lock(&mu_);
    stopped_ = true;
    cv_.SignalAll();
    all.swap(live_);
    for (auto& c : others_) all.push_back(std::move(c));
    others_.clear();
  }
  for (auto& c : all) engine_.Unwatch(c.get());
  all.clear();  // closes the handles: in-flight commands finish UNAVAILABLE
  if (server_ != nullptr) server_->Stop();
}

UpstreamStats Core::Stats() const {
  UpstreamStats s;
  s.commands_issued = counters_.issued.load();
  s.commands_in_flight = counters_.in_flight.load();
  s.commands_failed = counters_.failed.load();
  s.commands_timed_out = counters_.timed_out.load();
  s.caller_deadlines_passed = counters_.caller_deadlines.load();
  s.health_probes = counters_.probes.load();
  sync::MutexLock lock(&mu_);
  s.reconnects = reconnects_;
  s.connections_lost = lost_;
  s.soft_disconnects = soft_disconnects_;
  for (const auto& c : live_) s.connections.push_back(c->Stats());
  return s;
}

std::shared_ptr<Conn> Core::Pick() {
  sync::MutexLock lock(&mu_);
  std::shared_ptr<Conn> best;
  for (const auto& c : live_) {
    if (best == nullptr || c->in_flight() < best->in_flight()) best = c;
  }
  return best;
}

bool Core::Wanted(const std::vector<std::shared_ptr<Conn>>& list,
                  Conn* c) const {
  for (const auto& x : list) {
    if (x.get() == c) return true;
  }
  return false;
}

bool Core::OnHandshakeDone(Conn* c, UpstreamInfo info) {
  bool notify = false;
  {
    sync::MutexLock lock(&mu_);
    if (stopped_) return false;
    auto it = std::find_if(others_.begin(), others_.end(),
                           [c](const auto& x) { return x.get() == c; });
    if (it == others_.end()) return false;
    std::shared_ptr<Conn> ref = std::move(*it);
    others_.erase(it);
    --connecting_;
    info.read_only = info.read_only || force_read_only_;
    if (!uri_.empty()) {
      // Keep the query (socket path, TLS options) out of descriptions.
      info.description = absl::StrCat("nbd ", uri_.substr(0, uri_.find('?')));
      if (absl::StrContains(uri_, "socket="))
        info.description += " (unix socket)";
    } else {
      info.description =
          absl::StrCat("spawned [", absl::StrJoin(server_->argv(), " "), "]");
    }
    info_ = std::move(info);
    have_info_ = true;
    target_ = (info_.can_multi_conn || info_.read_only) ? max_connections_ : 1;
    if (static_cast<int>(live_.size()) >= target_) {
      others_.push_back(std::move(ref));  // Close() forgets it
      return false;
    }
    live_.push_back(std::move(ref));
    if (!round_bumped_) {  // once per reconnect round
      round_bumped_ = true;
      ++generation_;
      if (ever_connected_) ++reconnects_;
      ever_connected_ = true;
      notify = true;
    }
    last_error_.clear();
    last_exit_.clear();
    backoff_ = kMinBackoff;
    cv_.SignalAll();
    if (static_cast<int>(live_.size()) + connecting_ < target_) {
      ScheduleAttemptLocked(absl::Now());  // fill the pool
    }
    if (notify) GenerationChangedLocked();
  }
  return true;
}

void Core::OnHandshakeFailed(Conn* c, const absl::Status& why) {
  sync::MutexLock lock(&mu_);
  last_error_ = std::string(why.message());
  std::string exit;
  if (server_ != nullptr && !server_->Running()) {
    exit = server_->ExitDescription();
    last_exit_ = exit;
  }
  if (exit.empty()) exit = last_exit_;
  if (!exit.empty()) absl::StrAppend(&last_error_, " (server ", exit, ")");
  if (Wanted(others_, c)) --connecting_;
  RetryLaterLocked();
}

void Core::OnDraining(Conn* c) {
  sync::MutexLock lock(&mu_);
  auto it = std::find_if(live_.begin(), live_.end(),
                         [c](const auto& x) { return x.get() == c; });
  if (it == live_.end()) return;
  others_.push_back(std::move(*it));
  live_.erase(it);
  ++soft_disconnects_;
  ++lost_;
  round_bumped_ = false;
  if (live_.empty()) {
    last_error_ = absl::StrCat("export ", name_,
                               ": upstream is shutting down (ESHUTDOWN)");
    ++generation_;  // during the outage the image may change
    GenerationChangedLocked();
  }
  cv_.SignalAll();
  RetryLaterLocked();
}

std::shared_ptr<Conn> Core::Forget(Conn* c, bool lost,
                                   const absl::Status& why) {
  sync::MutexLock lock(&mu_);
  std::shared_ptr<Conn> ref;
  auto it = std::find_if(live_.begin(), live_.end(),
                         [c](const auto& x) { return x.get() == c; });
  if (it != live_.end()) {
    ref = std::move(*it);
    live_.erase(it);
    if (lost) ++lost_;
    round_bumped_ = false;
    if (live_.empty()) {
      last_error_ = std::string(why.message());
      ++generation_;  // during the outage the image may change
      GenerationChangedLocked();
    }
    cv_.SignalAll();
    // The first attempt after a loss is immediate.
    if (!stopped_) ScheduleAttemptLocked(absl::Now());
    return ref;
  }
  it = std::find_if(others_.begin(), others_.end(),
                    [c](const auto& x) { return x.get() == c; });
  if (it != others_.end()) {
    ref = std::move(*it);
    others_.erase(it);
  }
  return ref;
}

void Core::ScheduleAttempt(absl::Time when) {
  sync::MutexLock lock(&mu_);
  ScheduleAttemptLocked(when);
}

void Core::ScheduleAttemptLocked(absl::Time when) {
  mu_.AssertHeld();
  if (stopped_) return;
  if (attempt_scheduled_ && attempt_at_ <= when) return;
  attempt_scheduled_ = true;
  attempt_at_ = when;
  std::weak_ptr<Core> weak = weak_from_this();
  engine_.RunAt(when, [weak, when] {
    std::shared_ptr<Core> core = weak.lock();
    if (core == nullptr) return;
    {
      sync::MutexLock lock(&core->mu_);
      if (core->attempt_at_ != when) return;  // superseded by an earlier one
      core->attempt_scheduled_ = false;
      core->attempt_at_ = absl::InfiniteFuture();
    }
    core->Attempt();
  });
}

void Core::RetryLaterLocked() {
  mu_.AssertHeld();
  std::uniform_real_distribution<double> jitter(0.5, 1.5);
  const absl::Duration wait = backoff_ * jitter(rng_);
  backoff_ = std::min(backoff_ * 2, kMaxBackoff);
  ScheduleAttemptLocked(absl::Now() + wait);
}

void Core::GenerationChangedLocked() {
  mu_.AssertHeld();
  if (notify_scheduled_) return;
  notify_scheduled_ = true;
  std::weak_ptr<Core> weak = weak_from_this();
  engine_.RunAt(absl::Now(), [weak] {
    if (std::shared_ptr<Core> core = weak.lock())
      core->NotifyGenerationChange();
  });
}

void Core::NotifyGenerationChange() {
  std::function<void()> fn;
  {
    sync::MutexLock lock(&mu_);
    notify_scheduled_ = false;
    if (stopped_ || generation_ == notified_generation_) return;
    notified_generation_ = generation_;
    fn = on_generation_change_;
  }
  if (fn) fn();
}

void Core::Attempt() {
  int need;
  {
    sync::MutexLock lock(&mu_);
    if (stopped_) return;
    need = target_ - static_cast<int>(live_.size()) - connecting_;
  }
  if (need <= 0) return;
  if (server_ != nullptr && !server_->Running()) {
    const std::string exit = server_->ExitDescription();
    absl::Status s = server_->Start();
    sync::MutexLock lock(&mu_);
    if (!exit.empty()) last_exit_ = exit;
    if (!s.ok()) {
      last_error_ = std::string(s.message());
      RetryLaterLocked();
      return;
    }
  }
  for (int i = 0; i < need; ++i) {
    absl::StatusOr<nbd_handle*> h =
        StartConnect(uri_, server_ != nullptr ? server_->socket_path() : "");
    absl::Status s = h.status();
    std::shared_ptr<Conn> conn;  // on failure, closed after the lock
    sync::MutexLock lock(&mu_);
    if (s.ok()) {
      conn = std::make_shared<Conn>(shared_from_this(), *h,
                                    absl::Now() + timeout_);
      if (stopped_) return;
      // Watched under mu_ so that Shutdown() cannot miss it; its first
      // callback waits for mu_ and finds it in others_.
      s = engine_.Watch(conn);
      if (s.ok()) {
        others_.push_back(std::move(conn));
        ++connecting_;
        continue;
      }
    }
    if (stopped_) return;
    last_error_ = absl::StrCat("export ", name_, ": connect: ", s.message());
    std::string exit = last_exit_;
    if (server_ != nullptr && !server_->Running()) {
      exit = server_->ExitDescription();
      last_exit_ = exit;
    }
    if (!exit.empty()) absl::StrAppend(&last_error_, " (server ", exit, ")");
    RetryLaterLocked();
    return;
  }
}

// --- NbdUpstream: the facade -----------------------------------------------

// The result of an asynchronous command a synchronous caller waits for.
template <typename T>
class Pending {
 public:
  void Set(T v) {
    sync::MutexLock lock(&mu_);
    result_ = std::move(v);
    cv_.SignalAll();
  }
  // nullopt when `deadline` passed first.
  std::optional<T> Wait(absl::Time deadline) {
    sync::MutexLock lock(&mu_);
    while (!result_.has_value()) {
      if (mu_.WaitWithDeadline(&cv_, deadline)) break;
    }
    return std::move(result_);
  }

 private:
  sync::Mutex mu_;
  absl::CondVar cv_;
  std::optional<T> result_ ABSL_GUARDED_BY(mu_);
};

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
  using Call = absl::FunctionRef<int64_t(nbd_handle*, nbd_completion_callback)>;
  // Sends one command on the least busy connection.
  void Submit(std::unique_ptr<Op> op, Call call);
  void SubmitStatus(const char* what, StatusCallback done, Call call) {
    auto op = std::make_unique<StatusOp>();
    op->what = what;
    op->done = std::move(done);
    Submit(std::move(op), call);
  }
  // Waits for an asynchronous status command until `deadline`.
  absl::Status Await(const char* what, absl::Time deadline,
                     absl::FunctionRef<void(StatusCallback)> start);
  // A command whose FUA the server cannot honour gets a flush afterwards:
  // the same guarantee.
  StatusCallback WithFuaFallback(bool fua, const UpstreamInfo& info,
                                 StatusCallback done);
  absl::Status CheckRange(const UpstreamInfo& info, uint64_t count,
                          uint64_t offset, absl::string_view what) const;
  absl::Status CheckWritable(const UpstreamInfo& info,
                             absl::string_view what) const;
  static uint32_t FuaFlag(uint32_t flags, const UpstreamInfo& info) {
    return (flags & kCmdFlagFua) != 0 && info.can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  }

  const std::shared_ptr<Core> core_;
  const uint64_t change_granularity_;  // see Upstream::ChangeGranularity
};

void NbdUpstream::Submit(std::unique_ptr<Op> op, Call call) {
  std::shared_ptr<Conn> conn = core_->Pick();
  if (conn == nullptr) {
    op->Finish(core_->NotReady());
    return;
  }
  conn->Issue(op.release(), call);
}

absl::Status NbdUpstream::Await(const char* what, absl::Time deadline,
                                absl::FunctionRef<void(StatusCallback)> start) {
  auto pending = std::make_shared<Pending<absl::Status>>();
  start([pending](absl::Status s) { pending->Set(std::move(s)); });
  std::optional<absl::Status> s = pending->Wait(deadline);
  if (s.has_value()) return *std::move(s);
  core_->counters().caller_deadlines.fetch_add(1);
  return absl::DeadlineExceededError(
      absl::StrCat("export ", core_->name(), ": upstream ", what,
                   " did not complete before the caller's deadline (the "
                   "command goes on)"));
}

absl::Status NbdUpstream::CheckRange(const UpstreamInfo& info, uint64_t count,
                                     uint64_t offset,
                                     absl::string_view what) const {
  if (offset > info.size || count > info.size - offset) {
    return absl::OutOfRangeError(
        absl::StrCat("export ", core_->name(), ": ", what, " [", offset, ", +",
                     count, ") is past the end (size ", info.size, ")"));
  }
  return absl::OkStatus();
}

absl::Status NbdUpstream::CheckWritable(const UpstreamInfo& info,
                                        absl::string_view what) const {
  if (info.read_only) {
    return absl::PermissionDeniedError(absl::StrCat(
        "export ", core_->name(), " is read-only: ", what, " refused"));
  }
  return absl::OkStatus();
}

StatusCallback NbdUpstream::WithFuaFallback(bool fua, const UpstreamInfo& info,
                                            StatusCallback done) {
  if (!fua || info.can_fua) return done;
  return [this, done = std::move(done)](absl::Status s) mutable {
    if (!s.ok()) {
      std::move(done)(std::move(s));
      return;
    }
    AsyncFlush(std::move(done));
  };
}

void NbdUpstream::AsyncBlockStatus(const std::string& context, uint64_t offset,
                                   uint64_t length, ExtentsCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  if (std::find(info->contexts.begin(), info->contexts.end(), context) ==
      info->contexts.end()) {
    return std::move(done)(absl::FailedPreconditionError(absl::StrCat(
        "export ", core_->name(), " does not offer context ", context,
        "; offered: ", absl::StrJoin(info->contexts, ", "))));
  }
  if (length == 0) {
    return std::move(done)(
        absl::InvalidArgumentError("block status of zero length"));
  }
  if (offset >= info->size) {
    return std::move(done)(absl::OutOfRangeError(
        absl::StrCat("export ", core_->name(), ": offset ", offset,
                     " is at or past the end (size ", info->size, ")")));
  }
  uint64_t count = std::min(length, info->size - offset);
  if (count > kMaxBlockStatusRequest) {
    const uint64_t align = std::max<uint64_t>(info->minimum_block_size, 1);
    count = kMaxBlockStatusRequest / align * align;
  }
  auto op = std::make_unique<ExtentsOp>();
  op->what = "block status";
  op->name = core_->name();
  op->context = context;
  op->offset = offset;
  op->size = info->size;
  op->done = std::move(done);
  ExtentsOp* raw = op.get();
  Submit(std::move(op), [&](nbd_handle* h, nbd_completion_callback cb) {
    return nbd_aio_block_status(
        h, count, offset, nbd_extent_callback{ExtentsOp::OnChunk, raw, nullptr},
        cb, 0);
  });
}

void NbdUpstream::AsyncPread(void* buf, uint64_t count, uint64_t offset,
                             StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  absl::Status s = CheckRange(*info, count, offset, "read");
  if (!s.ok()) return std::move(done)(s);
  const uint64_t max = std::max<uint64_t>(info->maximum_block_size, 4096);
  IssueChunked(
      offset, count, max,
      [&](uint64_t off, uint64_t n, uint64_t delta, StatusCallback cb) {
        SubmitStatus("read", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_pread(h, static_cast<char*>(buf) + delta,
                                            n, off, c, 0);
                     });
      },
      std::move(done));
}

void NbdUpstream::AsyncPwrite(const void* buf, uint64_t count, uint64_t offset,
                              uint32_t flags, StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  absl::Status s = CheckWritable(*info, "write");
  if (s.ok()) s = CheckRange(*info, count, offset, "write");
  if (!s.ok()) return std::move(done)(s);
  const uint32_t nbd_flags = FuaFlag(flags, *info);
  const uint64_t max = std::max<uint64_t>(info->maximum_block_size, 4096);
  IssueChunked(
      offset, count, max,
      [&](uint64_t off, uint64_t n, uint64_t delta, StatusCallback cb) {
        SubmitStatus("write", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_pwrite(
                           h, static_cast<const char*>(buf) + delta, n, off, c,
                           nbd_flags);
                     });
      },
      WithFuaFallback((flags & kCmdFlagFua) != 0, *info, std::move(done)));
}

void NbdUpstream::AsyncTrim(uint64_t count, uint64_t offset, uint32_t flags,
                            StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  absl::Status s = CheckWritable(*info, "trim");
  if (s.ok()) s = CheckRange(*info, count, offset, "trim");
  if (!s.ok()) return std::move(done)(s);
  if (!info->can_trim) {
    return std::move(done)(absl::UnimplementedError(absl::StrCat(
        "export ", core_->name(), ": upstream does not support trim")));
  }
  const uint32_t nbd_flags = FuaFlag(flags, *info);
  IssueChunked(
      offset, count, kMaxEffectLength,
      [&](uint64_t off, uint64_t n, uint64_t, StatusCallback cb) {
        SubmitStatus("trim", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_trim(h, n, off, c, nbd_flags);
                     });
      },
      WithFuaFallback((flags & kCmdFlagFua) != 0, *info, std::move(done)));
}

void NbdUpstream::AsyncZero(uint64_t count, uint64_t offset, uint32_t flags,
                            StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  absl::Status s = CheckWritable(*info, "write zeroes");
  if (s.ok()) s = CheckRange(*info, count, offset, "write zeroes");
  if (!s.ok()) return std::move(done)(s);
  if (!info->can_zero) {
    return std::move(done)(absl::UnimplementedError(absl::StrCat(
        "export ", core_->name(), ": upstream does not support write zeroes")));
  }
  if ((flags & kCmdFlagFastZero) != 0 && !info->can_fast_zero) {
    return std::move(done)(absl::UnimplementedError(
        absl::StrCat("export ", core_->name(), ": upstream cannot zero fast")));
  }
  uint32_t nbd_flags = FuaFlag(flags, *info);
  if (flags & kCmdFlagNoHole) nbd_flags |= LIBNBD_CMD_FLAG_NO_HOLE;
  if (flags & kCmdFlagFastZero) nbd_flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
  IssueChunked(
      offset, count, kMaxEffectLength,
      [&](uint64_t off, uint64_t n, uint64_t, StatusCallback cb) {
        SubmitStatus("write zeroes", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_zero(h, n, off, c, nbd_flags);
                     });
      },
      WithFuaFallback((flags & kCmdFlagFua) != 0, *info, std::move(done)));
}

void NbdUpstream::AsyncFlush(StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  if (!info->can_flush) return std::move(done)(absl::OkStatus());
  SubmitStatus("flush", std::move(done),
               [&](nbd_handle* h, nbd_completion_callback c) {
                 return nbd_aio_flush(h, c, 0);
               });
}

void NbdUpstream::AsyncCache(uint64_t count, uint64_t offset,
                             StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  absl::Status s = CheckRange(*info, count, offset, "cache");
  if (!s.ok()) return std::move(done)(s);
  if (!info->can_cache) return std::move(done)(absl::OkStatus());  // advisory
  IssueChunked(
      offset, count, kMaxEffectLength,
      [&](uint64_t off, uint64_t n, uint64_t, StatusCallback cb) {
        SubmitStatus("cache", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_cache(h, n, off, c, 0);
                     });
      },
      std::move(done));
}

// --- synchronous forms: waits on the asynchronous ones ---
//
// A caller whose deadline passes gets DEADLINE_EXCEEDED while the command
// runs on (bounded by upstream_timeout_ms). Buffers must then outlive the
// caller's frame: with a finite deadline, data goes through a buffer the
// command owns.

absl::StatusOr<ExtentList> NbdUpstream::BlockStatus(const std::string& context,
                                                    uint64_t offset,
                                                    uint64_t length,
                                                    absl::Time deadline) {
  auto pending = std::make_shared<Pending<absl::StatusOr<ExtentList>>>();
  AsyncBlockStatus(
      context, offset, length,
      [pending](absl::StatusOr<ExtentList> r) { pending->Set(std::move(r)); });
  std::optional<absl::StatusOr<ExtentList>> r = pending->Wait(deadline);
  if (r.has_value()) return *std::move(r);
  core_->counters().caller_deadlines.fetch_add(1);
  return absl::DeadlineExceededError(
      absl::StrCat("export ", core_->name(),
                   ": upstream block status did not complete before the "
                   "caller's deadline (the command goes on)"));
}

absl::Status NbdUpstream::Pread(void* buf, uint64_t count, uint64_t offset,
                                absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) {
    return Await("read", deadline, [&](StatusCallback cb) {
      AsyncPread(buf, count, offset, std::move(cb));
    });
  }
  // Not value-initialised: the read fills it (no memset on the data path).
  std::shared_ptr<char[]> bounce(new char[std::max<uint64_t>(count, 1)]);
  absl::Status s = Await("read", deadline, [&](StatusCallback cb) {
    AsyncPread(bounce.get(), count, offset,
               [bounce, cb = std::move(cb)](absl::Status s) mutable {
                 std::move(cb)(std::move(s));
               });
  });
  if (s.ok() && count > 0) std::memcpy(buf, bounce.get(), count);
  return s;
}

absl::Status NbdUpstream::Pwrite(const void* buf, uint64_t count,
                                 uint64_t offset, uint32_t flags,
                                 absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) {
    return Await("write", deadline, [&](StatusCallback cb) {
      AsyncPwrite(buf, count, offset, flags, std::move(cb));
    });
  }
  auto copy = std::make_shared<std::vector<char>>(
      static_cast<const char*>(buf), static_cast<const char*>(buf) + count);
  return Await("write", deadline, [&](StatusCallback cb) {
    AsyncPwrite(copy->data(), count, offset, flags,
                [copy, cb = std::move(cb)](absl::Status s) mutable {
                  std::move(cb)(std::move(s));
                });
  });
}

absl::Status NbdUpstream::Trim(uint64_t count, uint64_t offset, uint32_t flags,
                               absl::Time deadline) {
  return Await("trim", deadline, [&](StatusCallback cb) {
    AsyncTrim(count, offset, flags, std::move(cb));
  });
}

absl::Status NbdUpstream::Zero(uint64_t count, uint64_t offset, uint32_t flags,
                               absl::Time deadline) {
  return Await("write zeroes", deadline, [&](StatusCallback cb) {
    AsyncZero(count, offset, flags, std::move(cb));
  });
}

absl::Status NbdUpstream::Flush(absl::Time deadline) {
  return Await("flush", deadline,
               [&](StatusCallback cb) { AsyncFlush(std::move(cb)); });
}

absl::Status NbdUpstream::Cache(uint64_t count, uint64_t offset,
                                absl::Time deadline) {
  return Await("cache", deadline, [&](StatusCallback cb) {
    AsyncCache(count, offset, std::move(cb));
  });
}

}  // namespace

std::string ImageFormat(const blockmeta::v1::ImageUpstream& image) {
  if (!image.format().empty()) return image.format();
  return absl::EndsWith(image.path(), ".qcow2") ? "qcow2" : "raw";
}

std::vector<std::string> QemuNbdArgv(const blockmeta::v1::ImageUpstream& image,
                                     bool read_only) {
  std::vector<std::string> argv = {"qemu-nbd", "-f", ImageFormat(image),
                                   "--shared=0", "--persistent"};
  if (read_only || image.read_only()) argv.push_back("--read-only");
  for (const std::string& b : image.bitmaps()) {
    argv.push_back("-B");
    argv.push_back(b);
  }
  argv.push_back("--");
  argv.push_back(image.path());
  return argv;
}

// The unit a write may change in a qcow2 image: the largest of its cluster
// size and its bitmaps' granularities (qemu-img info); 0 for raw images or
// when the probe fails (the shim then keeps its configured granularity).
uint64_t LearnChangeGranularity(const blockmeta::v1::ExportConfig& config) {
  if (ImageFormat(config.image()) != "qcow2") return 0;
  absl::StatusOr<ImageGranularity> g =
      ProbeQcow2Granularity(config.image().path());
  if (!g.ok()) {
    LogWarning("image_probe_failed",
               {{"export", config.name()},
                {"reason", g.status().ToString().substr(0, 256)}});
    return 0;
  }
  LogInfo(
      "image_probed",
      {{"export", config.name()},
       {"cluster_size", static_cast<uint64_t>(g->cluster_size)},
       {"bitmap_granularity", static_cast<uint64_t>(g->bitmap_granularity)}});
  return g->Max();
}

absl::StatusOr<std::unique_ptr<Upstream>> CreateUpstream(
    const blockmeta::v1::ExportConfig& config) {
  std::unique_ptr<SpawnedServer> server;
  uint64_t change_granularity = 0;
  switch (config.upstream_case()) {
    case blockmeta::v1::ExportConfig::kNbdUri:
      break;
    case blockmeta::v1::ExportConfig::kImage: {
      change_granularity = LearnChangeGranularity(config);
      auto s = SpawnedServer::Create(
          QemuNbdArgv(config.image(), config.read_only()));
      if (!s.ok()) return s.status();
      server = std::move(*s);
      break;
    }
    case blockmeta::v1::ExportConfig::kCommand: {
      auto s = SpawnedServer::Create(
          {config.command().argv().begin(), config.command().argv().end()});
      if (!s.ok()) return s.status();
      server = std::move(*s);
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("export ", config.name(), ": no upstream set"));
  }
  return std::unique_ptr<Upstream>(new NbdUpstream(
      std::make_shared<Core>(config, std::move(server), NbdEngine::Default()),
      change_granularity));
}

pid_t SpawnedServerPidForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<NbdUpstream*>(upstream);
  return u != nullptr ? u->ServerPid() : -1;
}

std::string SpawnedServerSocketForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<NbdUpstream*>(upstream);
  return u != nullptr ? u->ServerSocket() : "";
}

int LiveConnectionsForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<NbdUpstream*>(upstream);
  return u != nullptr ? u->LiveConnections() : -1;
}

int UpstreamEngineThreads() { return NbdEngine::Default().threads(); }

}  // namespace blockmeta
