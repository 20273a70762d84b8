// server/upstream/nbd_upstream_impl.cc — see nbd_upstream_impl.h.
#include "server/upstream/nbd_upstream_impl.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/upstream/chunked.h"

namespace blockmeta {
namespace upstream_internal {
namespace {

// Largest block status request: the 32-bit limit rounded down to 1 MiB.
// Exactly 2^32 - 1 makes nbdkit 1.32 abort (assertion in
// extents_to_block_descriptors); an aligned size also suits every server.
constexpr uint64_t kMaxBlockStatusRequest =
    kMaxNbdRequestLength / (1u << 20) * (1u << 20);
// Trim/zero/cache lengths are 32-bit in NBD without extended headers.
constexpr uint64_t kMaxEffectLength = uint64_t{1} << 31;

// Sends one command on the pool's least busy connection.
void Submit(Core& core, std::unique_ptr<Op> op, IssueCall call) {
  std::shared_ptr<Conn> conn = core.Pick();
  if (conn == nullptr) {
    op->Finish(core.NotReady());
    return;
  }
  conn->Issue(op.release(), call);
}

void SubmitStatus(Core& core, const char* what, StatusCallback done,
                  IssueCall call) {
  auto op = std::make_unique<StatusOp>();
  op->what = what;
  op->done = std::move(done);
  Submit(core, std::move(op), call);
}

void FlushOn(Core& core, StatusCallback done) {
  absl::StatusOr<UpstreamInfo> info = core.ConnectedInfo();
  if (!info.ok()) return std::move(done)(info.status());
  if (!info->can_flush) return std::move(done)(absl::OkStatus());
  SubmitStatus(core, "flush", std::move(done),
               [&](nbd_handle* h, nbd_completion_callback c) {
                 return nbd_aio_flush(h, c, 0);
               });
}

}  // namespace

template <typename T>
T NbdUpstream::Await(
    const char* what, absl::Time deadline,
    absl::FunctionRef<void(absl::AnyInvocable<void(T) &&>)> start) {
  auto pending = std::make_shared<Pending<T>>();
  start([pending](T r) { pending->Set(std::move(r)); });
  std::optional<T> r = pending->Wait(deadline);
  if (r.has_value()) return *std::move(r);
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

std::optional<NbdUpstream::WriteStart> NbdUpstream::BeginWrite(
    const char* what, uint64_t count, uint64_t offset, uint32_t flags,
    StatusCallback done,
    absl::FunctionRef<absl::Status(const UpstreamInfo&)> supported) {
  absl::StatusOr<UpstreamInfo> info = core_->ConnectedInfo();
  absl::Status s = info.status();
  if (s.ok() && info->read_only) {
    s = absl::PermissionDeniedError(absl::StrCat(
        "export ", core_->name(), " is read-only: ", what, " refused"));
  }
  if (s.ok()) s = CheckRange(*info, count, offset, what);
  if (s.ok()) s = supported(*info);
  if (!s.ok()) {
    std::move(done)(std::move(s));
    return std::nullopt;
  }
  WriteStart w;
  const bool fua = (flags & kCmdFlagFua) != 0;
  w.nbd_flags = fua && info->can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
  if (fua && !info->can_fua) {
    // The server cannot honour FUA: a flush after the command gives the
    // same guarantee. The completion holds the pool, never the facade.
    w.done = [core = core_, done = std::move(done)](absl::Status s) mutable {
      if (!s.ok()) return std::move(done)(std::move(s));
      FlushOn(*core, std::move(done));
    };
  } else {
    w.done = std::move(done);
  }
  w.info = *std::move(info);
  return w;
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
  Submit(*core_, std::move(op), [&](nbd_handle* h, nbd_completion_callback cb) {
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
        SubmitStatus(*core_, "read", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_pread(h, static_cast<char*>(buf) + delta,
                                            n, off, c, 0);
                     });
      },
      std::move(done));
}

void NbdUpstream::AsyncPwrite(const void* buf, uint64_t count, uint64_t offset,
                              uint32_t flags, StatusCallback done) {
  std::optional<WriteStart> w =
      BeginWrite("write", count, offset, flags, std::move(done),
                 [](const UpstreamInfo&) { return absl::OkStatus(); });
  if (!w.has_value()) return;
  const uint32_t nbd_flags = w->nbd_flags;
  const uint64_t max = std::max<uint64_t>(w->info.maximum_block_size, 4096);
  IssueChunked(
      offset, count, max,
      [&](uint64_t off, uint64_t n, uint64_t delta, StatusCallback cb) {
        SubmitStatus(*core_, "write", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_pwrite(
                           h, static_cast<const char*>(buf) + delta, n, off, c,
                           nbd_flags);
                     });
      },
      std::move(w->done));
}

void NbdUpstream::AsyncTrim(uint64_t count, uint64_t offset, uint32_t flags,
                            StatusCallback done) {
  std::optional<WriteStart> w = BeginWrite(
      "trim", count, offset, flags, std::move(done),
      [&](const UpstreamInfo& info) {
        return info.can_trim ? absl::OkStatus()
                             : absl::UnimplementedError(absl::StrCat(
                                   "export ", core_->name(),
                                   ": upstream does not support trim"));
      });
  if (!w.has_value()) return;
  const uint32_t nbd_flags = w->nbd_flags;
  IssueChunked(
      offset, count, kMaxEffectLength,
      [&](uint64_t off, uint64_t n, uint64_t, StatusCallback cb) {
        SubmitStatus(*core_, "trim", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_trim(h, n, off, c, nbd_flags);
                     });
      },
      std::move(w->done));
}

void NbdUpstream::AsyncZero(uint64_t count, uint64_t offset, uint32_t flags,
                            StatusCallback done) {
  std::optional<WriteStart> w = BeginWrite(
      "write zeroes", count, offset, flags, std::move(done),
      [&](const UpstreamInfo& info) {
        if (!info.can_zero) {
          return absl::UnimplementedError(
              absl::StrCat("export ", core_->name(),
                           ": upstream does not support write zeroes"));
        }
        if ((flags & kCmdFlagFastZero) != 0 && !info.can_fast_zero) {
          return absl::UnimplementedError(absl::StrCat(
              "export ", core_->name(), ": upstream cannot zero fast"));
        }
        return absl::OkStatus();
      });
  if (!w.has_value()) return;
  uint32_t nbd_flags = w->nbd_flags;
  if (flags & kCmdFlagNoHole) nbd_flags |= LIBNBD_CMD_FLAG_NO_HOLE;
  if (flags & kCmdFlagFastZero) nbd_flags |= LIBNBD_CMD_FLAG_FAST_ZERO;
  IssueChunked(
      offset, count, kMaxEffectLength,
      [&](uint64_t off, uint64_t n, uint64_t, StatusCallback cb) {
        SubmitStatus(*core_, "write zeroes", std::move(cb),
                     [&](nbd_handle* h, nbd_completion_callback c) {
                       return nbd_aio_zero(h, n, off, c, nbd_flags);
                     });
      },
      std::move(w->done));
}

void NbdUpstream::AsyncFlush(StatusCallback done) {
  FlushOn(*core_, std::move(done));
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
        SubmitStatus(*core_, "cache", std::move(cb),
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
  return Await<absl::StatusOr<ExtentList>>(
      "block status", deadline, [&](ExtentsCallback cb) {
        AsyncBlockStatus(context, offset, length, std::move(cb));
      });
}

absl::Status NbdUpstream::Pread(void* buf, uint64_t count, uint64_t offset,
                                absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) {
    return Await<absl::Status>("read", deadline, [&](StatusCallback cb) {
      AsyncPread(buf, count, offset, std::move(cb));
    });
  }
  // Not value-initialised: the read fills it (no memset on the data path).
  std::shared_ptr<char[]> bounce(new char[std::max<uint64_t>(count, 1)]);
  absl::Status s =
      Await<absl::Status>("read", deadline, [&](StatusCallback cb) {
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
    return Await<absl::Status>("write", deadline, [&](StatusCallback cb) {
      AsyncPwrite(buf, count, offset, flags, std::move(cb));
    });
  }
  auto copy = std::make_shared<std::vector<char>>(
      static_cast<const char*>(buf), static_cast<const char*>(buf) + count);
  return Await<absl::Status>("write", deadline, [&](StatusCallback cb) {
    AsyncPwrite(copy->data(), count, offset, flags,
                [copy, cb = std::move(cb)](absl::Status s) mutable {
                  std::move(cb)(std::move(s));
                });
  });
}

absl::Status NbdUpstream::Trim(uint64_t count, uint64_t offset, uint32_t flags,
                               absl::Time deadline) {
  return Await<absl::Status>("trim", deadline, [&](StatusCallback cb) {
    AsyncTrim(count, offset, flags, std::move(cb));
  });
}

absl::Status NbdUpstream::Zero(uint64_t count, uint64_t offset, uint32_t flags,
                               absl::Time deadline) {
  return Await<absl::Status>("write zeroes", deadline, [&](StatusCallback cb) {
    AsyncZero(count, offset, flags, std::move(cb));
  });
}

absl::Status NbdUpstream::Flush(absl::Time deadline) {
  return Await<absl::Status>(
      "flush", deadline, [&](StatusCallback cb) { AsyncFlush(std::move(cb)); });
}

absl::Status NbdUpstream::Cache(uint64_t count, uint64_t offset,
                                absl::Time deadline) {
  return Await<absl::Status>("cache", deadline, [&](StatusCallback cb) {
    AsyncCache(count, offset, std::move(cb));
  });
}

}  // namespace upstream_internal
}  // namespace blockmeta
