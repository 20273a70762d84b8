// server/upstream/nbd_upstream.cc — see nbd_upstream.h.
#include "server/upstream/nbd_upstream.h"

#include <errno.h>
#include <libnbd.h>
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/common/mutex.h"
#include "server/upstream/nbd_errors.h"
#include "server/upstream/spawned_server.h"

namespace blockmeta {
namespace {

constexpr absl::Duration kPollSlice = absl::Milliseconds(100);
constexpr absl::Duration kHealthInterval = absl::Milliseconds(250);
constexpr absl::Duration kMinBackoff = absl::Milliseconds(100);
constexpr absl::Duration kMaxBackoff = absl::Seconds(5);
// Largest block status request: the 32-bit limit rounded down to 1 MiB.
// Exactly 2^32 - 1 makes nbdkit 1.32 abort (assertion in
// extents_to_block_descriptors); an aligned size also suits every server.
constexpr uint64_t kMaxBlockStatusRequest =
    kMaxNbdRequestLength / (1u << 20) * (1u << 20);
// Trim/zero/cache lengths are 32-bit in NBD without extended headers.
constexpr uint64_t kMaxEffectLength = uint64_t{1} << 31;

int PollMs(absl::Duration left) {
  left = std::min(left, kPollSlice);
  int64_t ms =
      absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1)));
  return static_cast<int>(std::max<int64_t>(ms, 1));
}

bool HandleUsable(nbd_handle* h) {
  return nbd_aio_is_ready(h) == 1 || nbd_aio_is_processing(h) == 1;
}

// State of one asynchronous option request (opt_go / opt_list_meta_context).
struct OptDone {
  bool done = false;
  int error = 0;
};

int OptCompletion(void* user_data, int* error) {
  auto* d = static_cast<OptDone*>(user_data);
  d->done = true;
  d->error = *error;
  return 1;
}

int CollectContext(void* user_data, const char* name) {
  static_cast<std::vector<std::string>*>(user_data)->push_back(name);
  return 0;
}

// Collects the block status chunk of one context.
struct ExtentCollector {
  std::string context;
  uint64_t offset = 0;
  int chunks = 0;
  std::vector<uint32_t> entries;
  std::string error;
};

int CollectExtents(void* user_data, const char* metacontext, uint64_t offset,
                   uint32_t* entries, size_t nr_entries, int* error) {
  auto* c = static_cast<ExtentCollector*>(user_data);
  if (c->context != metacontext) return 0;
  if (++c->chunks > 1) {
    c->error = "more than one block status chunk for the context";
  } else if (offset != c->offset) {
    c->error = absl::StrCat("chunk for offset ", offset, ", asked ", c->offset);
  } else if (nr_entries % 2 != 0) {
    c->error = "odd number of extent words";
  } else {
    c->entries.assign(entries, entries + nr_entries);
  }
  return 0;
}

class NbdUpstream : public Upstream {
 public:
  NbdUpstream(const blockmeta::v1::ExportConfig& config,
              std::unique_ptr<SpawnedServer> server)
      : name_(config.name()),
        uri_(config.upstream_case() == blockmeta::v1::ExportConfig::kNbdUri
                 ? config.nbd_uri()
                 : ""),
        max_connections_(config.connections() != 0
                             ? config.connections()
                             : kDefaultUpstreamConnections),
        timeout_(absl::Milliseconds(config.upstream_timeout_ms() != 0
                                        ? config.upstream_timeout_ms()
                                        : kDefaultUpstreamTimeoutMs)),
        force_read_only_(config.read_only() ||
                         (config.has_image() && config.image().read_only())),
        server_(std::move(server)),
        slots_(max_connections_) {
    thread_ = std::thread([this] { BackgroundLoop(); });
  }

  ~NbdUpstream() override {
    {
      sync::MutexLock lock(&mu_);
      stop_ = true;
      cv_.SignalAll();
    }
    stopping_.store(true);
    thread_.join();
    sync::MutexLock lock(&mu_);
    for (Slot& s : slots_) {
      if (s.h != nullptr) nbd_close(s.h);  // no call may be in progress
      s.h = nullptr;
    }
    if (server_ != nullptr) server_->Stop();
  }

  bool Ready() const override {
    sync::MutexLock lock(&mu_);
    return live_ > 0;
  }

  bool WaitReady(absl::Time deadline) override {
    sync::MutexLock lock(&mu_);
    while (live_ == 0 && !stop_) {
      if (mu_.WaitWithDeadline(&cv_, deadline)) break;
    }
    return live_ > 0;
  }

  absl::StatusOr<UpstreamInfo> Info() const override {
    sync::MutexLock lock(&mu_);
    if (!have_info_) return NotReadyLocked();
    return info_;
  }

  std::string LastError() const override {
    sync::MutexLock lock(&mu_);
    return live_ > 0 ? "" : last_error_;
  }

  uint64_t Generation() const override {
    sync::MutexLock lock(&mu_);
    return generation_;
  }

  void SetOnGenerationChange(std::function<void()> fn) override {
    sync::MutexLock lock(&mu_);
    on_generation_change_ = std::move(fn);
  }

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

  pid_t ServerPid() const { return server_ != nullptr ? server_->pid() : -1; }
  int LiveConnections() const {
    sync::MutexLock lock(&mu_);
    return live_;
  }

 private:
  struct Slot {
    nbd_handle* h = nullptr;
    bool busy = false;
  };
  struct Lease {
    int slot;
    nbd_handle* h;
  };

  // --- data path ---
  absl::Status NotReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return absl::UnavailableError(
        absl::StrCat("export ", name_, ": upstream not connected",
                     last_error_.empty() ? "" : ": ", last_error_));
  }
  absl::StatusOr<UpstreamInfo> ConnectedInfo() const;
  absl::StatusOr<Lease> Acquire(absl::Time deadline);
  void Release(const Lease& lease, bool drop, const absl::Status& why);
  // Issues one command with `issue` (returns the cookie or -1) and drives
  // it to completion or the deadline.
  template <typename Issue>
  absl::Status Execute(absl::string_view what, absl::Time deadline,
                       Issue issue);
  absl::Status CheckRange(const UpstreamInfo& info, uint64_t count,
                          uint64_t offset, absl::string_view what) const;
  absl::Status CheckWritable(const UpstreamInfo& info,
                             absl::string_view what) const;

  // --- background thread ---
  void BackgroundLoop();
  void HealthCheck();
  // Brings up missing handles; returns true when the pool is complete.
  bool ConnectMissing();
  absl::StatusOr<nbd_handle*> ConnectOne(UpstreamInfo* info);
  // Drives `h` until `done()` or the connection deadline; false on timeout
  // or when the handle died (error in *status).
  template <typename Done>
  bool Drive(nbd_handle* h, absl::Time deadline, Done done,
             absl::Status* status);
  void NotifyGenerationChange();

  // Constant after construction.
  const std::string name_;
  const std::string uri_;  // for nbd_uri upstreams
  const int max_connections_;
  const absl::Duration timeout_;
  const bool force_read_only_;
  const std::unique_ptr<SpawnedServer> server_;  // internally synchronized
  std::thread thread_;
  std::atomic<bool> stopping_{false};  // mirrors stop_ for poll loops

  mutable sync::Mutex mu_;
  absl::CondVar cv_;  // signalled on every change of the state below
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);  // size max_connections_
  int live_ ABSL_GUARDED_BY(mu_) = 0;             // slots with a handle
  int target_ ABSL_GUARDED_BY(mu_) = 1;           // handles wanted (multi-conn)
  bool have_info_ ABSL_GUARDED_BY(mu_) = false;
  UpstreamInfo info_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_) = "connecting";
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t notified_generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;  // a handle was dropped
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> on_generation_change_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<UpstreamInfo> NbdUpstream::ConnectedInfo() const {
  sync::MutexLock lock(&mu_);
  if (live_ == 0 || !have_info_) return NotReadyLocked();
  return info_;
}

absl::StatusOr<NbdUpstream::Lease> NbdUpstream::Acquire(absl::Time deadline) {
  sync::MutexLock lock(&mu_);
  auto usable = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (live_ == 0 || stop_) return true;  // fail fast
    for (const Slot& s : slots_) {
      if (s.h != nullptr && !s.busy) return true;
    }
    return false;
  };
  while (!usable()) {
    if (mu_.WaitWithDeadline(&cv_, deadline)) break;
  }
  if (live_ == 0 || stop_) return NotReadyLocked();
  for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
    if (slots_[i].h != nullptr && !slots_[i].busy) {
      slots_[i].busy = true;
      return Lease{i, slots_[i].h};
    }
  }
  return absl::DeadlineExceededError(
      absl::StrCat("export ", name_,
                   ": deadline passed waiting for a free upstream connection"));
}

void NbdUpstream::Release(const Lease& lease, bool drop,
                          const absl::Status& why) {
  if (drop) nbd_close(lease.h);  // ours while busy: close outside the lock
  sync::MutexLock lock(&mu_);
  Slot& s = slots_[lease.slot];
  s.busy = false;
  cv_.SignalAll();
  if (!drop) return;
  s.h = nullptr;
  --live_;
  wake_ = true;
  if (live_ == 0) {
    last_error_ = std::string(why.message());
    ++generation_;  // nothing proves the image is unchanged when we return
  }
}

template <typename Issue>
absl::Status NbdUpstream::Execute(absl::string_view what, absl::Time deadline,
                                  Issue issue) {
  deadline = std::min(deadline, absl::Now() + timeout_);
  absl::StatusOr<Lease> lease = Acquire(deadline);
  if (!lease.ok()) return lease.status();
  nbd_handle* h = lease->h;
  absl::Status status;
  bool drop = false;
  const int64_t cookie = issue(h);
  if (cookie == -1) {
    status = StatusFromNbdError(what);
  } else {
    while (true) {
      const int r = nbd_aio_command_completed(h, cookie);
      if (r == 1) break;
      if (r == -1) {
        status = StatusFromNbdError(what);
        break;
      }
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) {
        status = absl::DeadlineExceededError(absl::StrCat(
            "export ", name_, ": upstream ", what,
            " did not complete before the deadline (connection dropped)"));
        drop = true;
        break;
      }
      if (nbd_poll(h, PollMs(left)) == -1) {
        status = StatusFromNbdError(what);
        break;
      }
    }
  }
  if (!status.ok() && !drop && !HandleUsable(h)) {
    drop = true;
    status = absl::UnavailableError(absl::StrCat(
        "export ", name_, ": upstream connection lost: ", status.message()));
  } else if (!status.ok() && !drop) {
    status = absl::Status(
        status.code(),
        absl::StrCat("export ", name_, ": upstream ", status.message()));
  }
  Release(*lease, drop, status);
  return status;
}

absl::Status NbdUpstream::CheckRange(const UpstreamInfo& info, uint64_t count,
                                     uint64_t offset,
                                     absl::string_view what) const {
  if (offset > info.size || count > info.size - offset) {
    return absl::OutOfRangeError(
        absl::StrCat("export ", name_, ": ", what, " [", offset, ", +", count,
                     ") is past the end (size ", info.size, ")"));
  }
  return absl::OkStatus();
}

absl::Status NbdUpstream::CheckWritable(const UpstreamInfo& info,
                                        absl::string_view what) const {
  if (info.read_only) {
    return absl::PermissionDeniedError(
        absl::StrCat("export ", name_, " is read-only: ", what, " refused"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ExtentList> NbdUpstream::BlockStatus(const std::string& context,
                                                    uint64_t offset,
                                                    uint64_t length,
                                                    absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  if (std::find(info->contexts.begin(), info->contexts.end(), context) ==
      info->contexts.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("export ", name_, " does not offer context ", context,
                     "; offered: ", absl::StrJoin(info->contexts, ", ")));
  }
  if (length == 0) {
    return absl::InvalidArgumentError("block status of zero length");
  }
  if (offset >= info->size) {
    return absl::OutOfRangeError(
        absl::StrCat("export ", name_, ": offset ", offset,
                     " is at or past the end (size ", info->size, ")"));
  }
  uint64_t count = std::min(length, info->size - offset);
  if (count > kMaxBlockStatusRequest) {
    const uint64_t align = std::max<uint64_t>(info->minimum_block_size, 1);
    count = kMaxBlockStatusRequest / align * align;
  }
  ExtentCollector collector;
  collector.context = context;
  collector.offset = offset;
  absl::Status s = Execute("block status", deadline, [&](nbd_handle* h) {
    return nbd_aio_block_status(
        h, count, offset,
        nbd_extent_callback{CollectExtents, &collector, nullptr},
        NBD_NULL_COMPLETION, 0);
  });
  if (!s.ok()) return s;
  auto malformed = [&](absl::string_view why) {
    return absl::InternalError(absl::StrCat("export ", name_,
                                            ": upstream sent a malformed block "
                                            "status reply for ",
                                            context, " at ", offset, ": ",
                                            why));
  };
  if (!collector.error.empty()) return malformed(collector.error);
  if (collector.chunks == 0 || collector.entries.empty()) {
    return malformed("no extents for the context");
  }
  ExtentList out;
  out.reserve(collector.entries.size() / 2);
  uint64_t cursor = offset;
  for (size_t i = 0; i + 1 < collector.entries.size(); i += 2) {
    const uint64_t len = collector.entries[i];
    if (len == 0) return malformed(absl::StrCat("zero-length extent #", i / 2));
    if (cursor >= info->size) break;  // past the end: ignore the rest
    const uint64_t clipped = std::min(len, info->size - cursor);
    out.push_back(Extent{cursor, clipped, collector.entries[i + 1]});
    cursor += clipped;
  }
  return out;
}

absl::Status NbdUpstream::Pread(void* buf, uint64_t count, uint64_t offset,
                                absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  absl::Status s = CheckRange(*info, count, offset, "read");
  if (!s.ok()) return s;
  const uint64_t max = std::max<uint64_t>(info->maximum_block_size, 4096);
  for (uint64_t done = 0; done < count;) {
    const uint64_t n = std::min(max, count - done);
    s = Execute("read", deadline, [&](nbd_handle* h) {
      return nbd_aio_pread(h, static_cast<char*>(buf) + done, n, offset + done,
                           NBD_NULL_COMPLETION, 0);
    });
    if (!s.ok()) return s;
    done += n;
  }
  return absl::OkStatus();
}

absl::Status NbdUpstream::Pwrite(const void* buf, uint64_t count,
                                 uint64_t offset, uint32_t flags,
                                 absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  absl::Status s = CheckWritable(*info, "write");
  if (s.ok()) s = CheckRange(*info, count, offset, "write");
  if (!s.ok()) return s;
  const bool fua = (flags & kCmdFlagFua) != 0;
  const uint32_t nbd_flags = fua && info->can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  const uint64_t max = std::max<uint64_t>(info->maximum_block_size, 4096);
  for (uint64_t done = 0; done < count;) {
    const uint64_t n = std::min(max, count - done);
    s = Execute("write", deadline, [&](nbd_handle* h) {
      return nbd_aio_pwrite(h, static_cast<const char*>(buf) + done, n,
                            offset + done, NBD_NULL_COMPLETION, nbd_flags);
    });
    if (!s.ok()) return s;
    done += n;
  }
  // FUA the server cannot do: a flush afterwards gives the same guarantee.
  if (fua && !info->can_fua) return Flush(deadline);
  return absl::OkStatus();
}

absl::Status NbdUpstream::Trim(uint64_t count, uint64_t offset, uint32_t flags,
                               absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  absl::Status s = CheckWritable(*info, "trim");
  if (s.ok()) s = CheckRange(*info, count, offset, "trim");
  if (!s.ok()) return s;
  if (!info->can_trim) {
    return absl::UnimplementedError(
        absl::StrCat("export ", name_, ": upstream does not support trim"));
  }
  const bool fua = (flags & kCmdFlagFua) != 0;
  const uint32_t nbd_flags = fua && info->can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  for (uint64_t done = 0; done < count;) {
    const uint64_t n = std::min(kMaxEffectLength, count - done);
    s = Execute("trim", deadline, [&](nbd_handle* h) {
      return nbd_aio_trim(h, n, offset + done, NBD_NULL_COMPLETION, nbd_flags);
    });
    if (!s.ok()) return s;
    done += n;
  }
  if (fua && !info->can_fua) return Flush(deadline);
  return absl::OkStatus();
}

absl::Status NbdUpstream::Zero(uint64_t count, uint64_t offset, uint32_t flags,
                               absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  absl::Status s = CheckWritable(*info, "write zeroes");
  if (s.ok()) s = CheckRange(*info, count, offset, "write zeroes");
  if (!s.ok()) return s;
  if (!info->can_zero) {
    return absl::UnimplementedError(absl::StrCat(
        "export ", name_, ": upstream does not support write zeroes"));
  }
  if ((flags & kCmdFlagFastZero) != 0 && !info->can_fast_zero) {
    return absl::UnimplementedError(
        absl::StrCat("export ", name_, ": upstream cannot zero fast"));
  }
  const bool fua = (flags & kCmdFlagFua) != 0;
  uint32_t nbd_flags = fua && info->can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  if (flags & kCmdFlagNoHole) nbd_flags |= LIBNBD_CMD_FLAG_NO_HOLE;
  if (flags & kCmdFlagFastZero) nbd_flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
  for (uint64_t done = 0; done < count;) {
    const uint64_t n = std::min(kMaxEffectLength, count - done);
    s = Execute("write zeroes", deadline, [&](nbd_handle* h) {
      return nbd_aio_zero(h, n, offset + done, NBD_NULL_COMPLETION, nbd_flags);
    });
    if (!s.ok()) return s;
    done += n;
  }
  if (fua && !info->can_fua) return Flush(deadline);
  return absl::OkStatus();
}

absl::Status NbdUpstream::Flush(absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  if (!info->can_flush) return absl::OkStatus();  // nothing to flush
  return Execute("flush", deadline, [&](nbd_handle* h) {
    return nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
  });
}

absl::Status NbdUpstream::Cache(uint64_t count, uint64_t offset,
                                absl::Time deadline) {
  absl::StatusOr<UpstreamInfo> info = ConnectedInfo();
  if (!info.ok()) return info.status();
  absl::Status s = CheckRange(*info, count, offset, "cache");
  if (!s.ok()) return s;
  if (!info->can_cache) return absl::OkStatus();  // advisory only
  for (uint64_t done = 0; done < count;) {
    const uint64_t n = std::min(kMaxEffectLength, count - done);
    s = Execute("cache", deadline, [&](nbd_handle* h) {
      return nbd_aio_cache(h, n, offset + done, NBD_NULL_COMPLETION, 0);
    });
    if (!s.ok()) return s;
    done += n;
  }
  return absl::OkStatus();
}

// --- background thread ---

void NbdUpstream::BackgroundLoop() {
  // (std:: rather than absl::BitGen: Debian's absl random pool is not
  // TSan-instrumented and reports false races.)
  std::minstd_rand rng(std::random_device{}());
  std::uniform_real_distribution<double> jitter(0.5, 1.5);
  absl::Duration backoff = kMinBackoff;
  absl::Time next_attempt = absl::InfinitePast();
  while (true) {
    bool missing;
    {
      sync::MutexLock lock(&mu_);
      missing = live_ < target_;
      absl::Time wake_at = absl::Now() + kHealthInterval;
      if (missing) wake_at = std::min(wake_at, next_attempt);
      while (!stop_ && !wake_ && generation_ == notified_generation_) {
        if (mu_.WaitWithDeadline(&cv_, wake_at)) break;
      }
      if (stop_) return;
      if (wake_ && live_ > 0) next_attempt = absl::Now();  // one handle lost
      wake_ = false;
      missing = live_ < target_;
    }
    NotifyGenerationChange();
    HealthCheck();
    if (missing && absl::Now() >= next_attempt) {
      if (ConnectMissing()) {
        backoff = kMinBackoff;
        next_attempt = absl::InfinitePast();
      } else {
        next_attempt = absl::Now() + backoff * jitter(rng);
        backoff = std::min(backoff * 2, kMaxBackoff);
      }
      NotifyGenerationChange();
    }
  }
}

void NbdUpstream::NotifyGenerationChange() {
  std::function<void()> fn;
  {
    sync::MutexLock lock(&mu_);
    if (generation_ == notified_generation_) return;
    notified_generation_ = generation_;
    fn = on_generation_change_;
  }
  if (fn) fn();
}

void NbdUpstream::HealthCheck() {
  // Idle handles whose server went away become readable (EOF): let libnbd
  // see it so the handle turns dead, and drop it.
  std::vector<Lease> idle;
  {
    sync::MutexLock lock(&mu_);
    for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
      if (slots_[i].h != nullptr && !slots_[i].busy) {
        slots_[i].busy = true;
        idle.push_back(Lease{i, slots_[i].h});
      }
    }
  }
  for (const Lease& lease : idle) {
    nbd_handle* h = lease.h;
    pollfd p{nbd_aio_get_fd(h), POLLIN, 0};
    if (p.fd >= 0 && poll(&p, 1, 0) > 0) nbd_aio_notify_read(h);
    absl::Status why;
    const bool dead = !HandleUsable(h);
    if (dead) {
      const char* err = nbd_get_error();
      why = absl::UnavailableError(
          absl::StrCat("export ", name_, ": upstream connection lost",
                       err != nullptr ? absl::StrCat(": ", err) : ""));
      if (server_ != nullptr && !server_->Running()) {
        why = absl::UnavailableError(absl::StrCat("export ", name_,
                                                  ": upstream server ",
                                                  server_->ExitDescription()));
      }
    }
    Release(lease, dead, why);
  }
}

bool NbdUpstream::ConnectMissing() {
  if (server_ != nullptr && !server_->Running()) {
    absl::Status s = server_->Start();
    if (!s.ok()) {
      sync::MutexLock lock(&mu_);
      last_error_ = std::string(s.message());
      return false;
    }
  }
  bool installed_any = false;
  bool complete = false;
  while (!stopping_.load()) {
    {
      sync::MutexLock lock(&mu_);
      if (live_ >= target_) {
        complete = true;
        break;
      }
    }
    UpstreamInfo info;
    absl::StatusOr<nbd_handle*> h = ConnectOne(&info);
    if (!h.ok()) {
      std::string why = std::string(h.status().message());
      if (server_ != nullptr && !server_->Running()) {
        why = absl::StrCat(why, " (server ", server_->ExitDescription(), ")");
      }
      sync::MutexLock lock(&mu_);
      last_error_ = why;
      break;
    }
    sync::MutexLock lock(&mu_);
    info_ = std::move(info);
    have_info_ = true;
    target_ = (info_.can_multi_conn || info_.read_only) ? max_connections_ : 1;
    int free_slot = -1;
    for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
      if (slots_[i].h == nullptr) {
        free_slot = i;
        break;
      }
    }
    if (free_slot < 0 || live_ >= target_) {  // pool shrank meanwhile
      nbd_close(*h);
      complete = true;
      break;
    }
    slots_[free_slot].h = *h;
    ++live_;
    cv_.SignalAll();
    if (!installed_any) ++generation_;  // once per reconnect round
    installed_any = true;
    last_error_.clear();
  }
  return complete;
}

template <typename Done>
bool NbdUpstream::Drive(nbd_handle* h, absl::Time deadline, Done done,
                        absl::Status* status) {
  while (!done()) {
    if (!HandleUsable(h) && nbd_aio_is_connecting(h) != 1 &&
        nbd_aio_is_negotiating(h) != 1 && nbd_aio_is_created(h) != 1) {
      *status = absl::UnavailableError("connection closed during handshake");
      return false;
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration() || stopping_.load()) {
      *status = absl::DeadlineExceededError("handshake timed out");
      return false;
    }
    if (nbd_poll(h, PollMs(left)) == -1) {
      *status = StatusFromNbdError("handshake");
      return false;
    }
  }
  return true;
}

absl::StatusOr<nbd_handle*> NbdUpstream::ConnectOne(UpstreamInfo* info) {
  nbd_handle* h = nbd_create();
  if (h == nullptr) return StatusFromNbdError("nbd_create");
  auto fail = [&](absl::Status s) {
    nbd_close(h);
    return absl::Status(
        s.code(), absl::StrCat("export ", name_, ": connect: ", s.message()));
  };
  const absl::Time deadline = absl::Now() + timeout_;
  if (nbd_set_opt_mode(h, true) == -1)
    return fail(StatusFromNbdError("opt mode"));
  int r;
  if (!uri_.empty()) {
    // The URI comes from the operator's configuration, not from a client:
    // let it name local files (nbds:// ...&tls-certificates=DIR or
    // tls-psk-file=FILE), which libnbd refuses by default.
    if (nbd_set_uri_allow_local_file(h, true) == -1) {
      return fail(StatusFromNbdError("uri allow local file"));
    }
    r = nbd_aio_connect_uri(h, uri_.c_str());
  } else {
    r = nbd_aio_connect_unix(h, server_->socket_path().c_str());
  }
  if (r == -1) return fail(StatusFromNbdError("connect"));
  absl::Status s;
  if (!Drive(
          h, deadline, [h] { return nbd_aio_is_connecting(h) != 1; }, &s)) {
    return fail(s);
  }
  std::vector<std::string> requested = {std::string(kBaseAllocation)};
  if (nbd_aio_is_negotiating(h) == 1) {
    // Discover the contexts on offer (an empty query lists them all).
    std::vector<std::string> offered;
    OptDone list_done;
    if (nbd_clear_meta_contexts(h) != -1 &&
        nbd_aio_opt_list_meta_context(
            h, nbd_context_callback{CollectContext, &offered, nullptr},
            nbd_completion_callback{OptCompletion, &list_done, nullptr}) !=
            -1) {
      if (!Drive(
              h, deadline, [&] { return list_done.done; }, &s)) {
        return fail(s);
      }
    }
    for (const std::string& c : offered) {
      if (IsDirtyBitmapContext(c) && c.size() > kDirtyBitmapPrefix.size() &&
          std::find(requested.begin(), requested.end(), c) == requested.end()) {
        requested.push_back(c);
      }
    }
    nbd_clear_meta_contexts(h);
    for (const std::string& c : requested) {
      if (nbd_add_meta_context(h, c.c_str()) == -1) {
        return fail(StatusFromNbdError("add meta context"));
      }
    }
    OptDone go_done;
    if (nbd_aio_opt_go(h, nbd_completion_callback{OptCompletion, &go_done,
                                                  nullptr}) == -1) {
      return fail(StatusFromNbdError("opt go"));
    }
    if (!Drive(
            h, deadline, [&] { return go_done.done; }, &s)) {
      return fail(s);
    }
    if (go_done.error != 0) {
      return fail(StatusFromErrno(go_done.error, "NBD_OPT_GO refused", ""));
    }
  }
  if (nbd_aio_is_ready(h) != 1) {
    return fail(absl::UnavailableError("handshake did not complete"));
  }
  const int64_t size = nbd_get_size(h);
  if (size < 0) return fail(StatusFromNbdError("get size"));
  info->size = static_cast<uint64_t>(size);
  const int64_t bmin = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  const int64_t bpref = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
  const int64_t bmax = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  if (bmin > 0) info->minimum_block_size = static_cast<uint32_t>(bmin);
  if (bpref > 0) info->preferred_block_size = static_cast<uint32_t>(bpref);
  if (bmax > 0) info->maximum_block_size = static_cast<uint32_t>(bmax);
  info->read_only = nbd_is_read_only(h) == 1 || force_read_only_;
  info->can_trim = nbd_can_trim(h) == 1;
  info->can_zero = nbd_can_zero(h) == 1;
  info->can_fast_zero = nbd_can_fast_zero(h) == 1;
  info->can_flush = nbd_can_flush(h) == 1;
  info->can_fua = nbd_can_fua(h) == 1;
  info->can_multi_conn = nbd_can_multi_conn(h) == 1;
  info->can_cache = nbd_can_cache(h) == 1;
  for (const std::string& c : requested) {
    if (nbd_can_meta_context(h, c.c_str()) == 1) info->contexts.push_back(c);
  }
  if (!uri_.empty()) {
    // Keep the query (socket path, TLS options) out of descriptions.
    info->description = absl::StrCat("nbd ", uri_.substr(0, uri_.find('?')));
    if (absl::StrContains(uri_, "socket=")) {
      info->description += " (unix socket)";
    }
  } else {
    info->description =
        absl::StrCat("spawned [", absl::StrJoin(server_->argv(), " "), "]");
  }
  return h;
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

absl::StatusOr<std::unique_ptr<Upstream>> CreateUpstream(
    const blockmeta::v1::ExportConfig& config) {
  std::unique_ptr<SpawnedServer> server;
  switch (config.upstream_case()) {
    case blockmeta::v1::ExportConfig::kNbdUri:
      break;
    case blockmeta::v1::ExportConfig::kImage: {
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
  return std::unique_ptr<Upstream>(new NbdUpstream(config, std::move(server)));
}

pid_t SpawnedServerPidForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<NbdUpstream*>(upstream);
  return u != nullptr ? u->ServerPid() : -1;
}

int LiveConnectionsForTesting(Upstream* upstream) {
  auto* u = dynamic_cast<NbdUpstream*>(upstream);
  return u != nullptr ? u->LiveConnections() : -1;
}

}  // namespace blockmeta
