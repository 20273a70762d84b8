// server/upstream/nbd_core.cc — see nbd_core.h.
#include "server/upstream/nbd_core.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "server/upstream/nbd_handshake.h"
#include "server/upstream/upstream_config.h"

namespace blockmeta {
namespace upstream_internal {

Core::Core(const blockmeta::v1::ExportConfig& config,
           std::unique_ptr<SpawnedServer> server, NbdEngine& engine)
    : name_(config.name()),
      uri_(config.upstream_case() == blockmeta::v1::ExportConfig::kNbdUri
               ? config.nbd_uri()
               : ""),
      max_connections_(config.connections() != 0 ? config.connections()
                                                 : kDefaultUpstreamConnections),
      timeout_(UpstreamTimeout(config)),
      force_read_only_(config.read_only() || config.immutable() ||
                       (config.has_image() && config.image().read_only())),
      server_(std::move(server)),
      engine_(engine) {}

void Core::Close(const absl::Status& why) {
  std::vector<std::shared_ptr<Conn>> all;
  {
    sync::MutexLock lock(&mu_);
    if (!stopped_) {
      stopped_ = true;
      closed_ = why;
      last_error_ = std::string(why.message());
    }
    cv_.SignalAll();
    all.swap(live_);
    for (auto& c : others_) all.push_back(std::move(c));
    others_.clear();
  }
  for (auto& c : all) {
    c->Abandon(closed_status());
    engine_.Unwatch(c.get());
  }
  // Closes the handles (or the driver callback running on one does when it
  // returns): what was in flight completes now with the reason.
  all.clear();
}

void Core::Shutdown() {
  Close(absl::UnavailableError(
      absl::StrCat("export ", name_, ": upstream connection closed")));
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
  if (server_ != nullptr) {
    s.bitmap_inconsistent_exits = server_->InconsistentBitmapExits();
  }
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
    start_failed_ = false;
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
  NoteServerExitLocked(exit);
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
    NoteServerExitLocked(s.ok() ? exit : std::string(s.message()));
    if (!s.ok()) {
      if (ever_connected_) last_error_ = std::string(s.message());
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
    NoteServerExitLocked(exit);
    RetryLaterLocked();
    return;
  }
}

void Core::NoteServerExitLocked(const std::string& exit) {
  mu_.AssertHeld();
  if (exit.empty() || ever_connected_) return;
  start_failed_ = true;
  last_error_ = absl::StrCat("export ", name_, ": spawned server [",
                             absl::StrJoin(server_->argv(), " ").substr(0, 256),
                             "] failed to start: ", exit);
  cv_.SignalAll();
}

}  // namespace upstream_internal
}  // namespace blockmeta
