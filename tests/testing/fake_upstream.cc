// tests/testing/fake_upstream.cc — see fake_upstream.h.
#include "tests/testing/fake_upstream.h"

#include <algorithm>
#include <cstring>

namespace blockmeta {

FakeUpstream::FakeUpstream(uint64_t size, uint32_t block, bool with_bitmap)
    : block_(block) {
  info_.size = size;
  info_.minimum_block_size = 1;
  info_.preferred_block_size = 4096;
  info_.maximum_block_size = 32u << 20;
  info_.can_trim = info_.can_zero = info_.can_flush = info_.can_fua = true;
  info_.can_cache = true;
  info_.contexts = {"base:allocation"};
  if (with_bitmap) info_.contexts.push_back("qemu:dirty-bitmap:b1");
  info_.description = "fake";
  sync::MutexLock lock(&mu_);
  data_.assign(size, '\0');
  const uint64_t blocks = (size + block - 1) / block;
  allocated_.assign(blocks, false);
  dirty_.assign(blocks, false);
}

absl::StatusOr<UpstreamInfo> FakeUpstream::Info() const {
  if (!ready_) return absl::UnavailableError("fake upstream not ready");
  return info_;
}

void FakeUpstream::Mark(uint64_t offset, uint64_t length, bool allocated) {
  if (length == 0) return;
  for (uint64_t b = offset / block_; b <= (offset + length - 1) / block_; ++b) {
    allocated_[b] = allocated;
    dirty_[b] = true;
  }
}

void FakeUpstream::Fill(uint64_t offset, uint64_t length, char byte) {
  sync::MutexLock lock(&mu_);
  memset(&data_[offset], byte, length);
  for (uint64_t b = offset / block_; b <= (offset + length - 1) / block_; ++b) {
    allocated_[b] = true;
  }
}

void FakeUpstream::SetContextTruth(const std::string& context,
                                   ExtentList truth) {
  if (std::find(info_.contexts.begin(), info_.contexts.end(), context) ==
      info_.contexts.end()) {
    info_.contexts.push_back(context);
  }
  sync::MutexLock lock(&mu_);
  truth_[context] = std::move(truth);
}

void FakeUpstream::FailNextBlockStatus(int n, absl::Status status) {
  sync::MutexLock lock(&mu_);
  fail_next_ = n;
  fail_status_ = std::move(status);
}

void FakeUpstream::SetReplyExtentsMax(size_t n) {
  sync::MutexLock lock(&mu_);
  reply_extents_max_ = n;
}

absl::StatusOr<ExtentList> FakeUpstream::BlockStatus(const std::string& context,
                                                     uint64_t offset,
                                                     uint64_t length,
                                                     absl::Time) {
  block_status_calls_.fetch_add(1);
  if (!ready_) return absl::UnavailableError("fake upstream not ready");
  {
    sync::MutexLock lock(&mu_);
    if (fail_next_ > 0) {
      --fail_next_;
      return fail_status_;
    }
    auto it = truth_.find(context);
    if (it != truth_.end()) {
      // Like servers that may answer past the requested length.
      ExtentList out;
      for (const Extent& e : it->second) {
        if (e.end() <= offset) continue;
        if (out.size() >= reply_extents_max_) break;
        if (!out.empty() && e.offset >= offset + length) break;
        Extent piece = e;
        if (piece.offset < offset) {
          piece.length -= offset - piece.offset;
          piece.offset = offset;
        }
        out.push_back(piece);
      }
      return out;
    }
  }
  const bool bitmap =
      context == "qemu:dirty-bitmap:b1" && info_.contexts.size() > 1;
  if (context != "base:allocation" && !bitmap) {
    return absl::FailedPreconditionError("context not negotiated");
  }
  if (offset >= info_.size || length == 0) {
    return absl::OutOfRangeError("bad range");
  }
  const uint64_t end = std::min(info_.size, offset + length);
  sync::MutexLock lock(&mu_);
  ExtentList out;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t b = pos / block_;
    uint32_t flags = bitmap ? (dirty_[b] ? 1u : 0u) : (allocated_[b] ? 0u : 3u);
    uint64_t stop = std::min<uint64_t>((b + 1) * block_, info_.size);
    if (!out.empty() && out.back().flags == flags && out.back().end() == pos) {
      out.back().length += stop - pos;
    } else {
      out.push_back({pos, stop - pos, flags});
    }
    pos = stop;
  }
  return out;
}

absl::Status FakeUpstream::Pread(void* buf, uint64_t count, uint64_t offset,
                                 absl::Time) {
  data_calls_.fetch_add(1);
  sync::MutexLock lock(&mu_);
  if (offset + count > data_.size()) return absl::OutOfRangeError("past end");
  memcpy(buf, &data_[offset], count);
  return absl::OkStatus();
}

absl::Status FakeUpstream::Pwrite(const void* buf, uint64_t count,
                                  uint64_t offset, uint32_t, absl::Time) {
  data_calls_.fetch_add(1);
  if (info_.read_only) return absl::PermissionDeniedError("read-only");
  sync::MutexLock lock(&mu_);
  if (offset + count > data_.size()) return absl::OutOfRangeError("past end");
  memcpy(&data_[offset], buf, count);
  Mark(offset, count, true);
  return absl::OkStatus();
}

absl::Status FakeUpstream::Trim(uint64_t count, uint64_t offset, uint32_t,
                                absl::Time) {
  data_calls_.fetch_add(1);
  sync::MutexLock lock(&mu_);
  if (offset + count > data_.size()) return absl::OutOfRangeError("past end");
  memset(&data_[offset], 0, count);
  // Only whole blocks become holes.
  uint64_t first = (offset + block_ - 1) / block_,
           last = (offset + count) / block_;
  for (uint64_t b = offset / block_; b <= (offset + count - 1) / block_; ++b) {
    dirty_[b] = true;
    if (b >= first && b < last) allocated_[b] = false;
  }
  return absl::OkStatus();
}

absl::Status FakeUpstream::Zero(uint64_t count, uint64_t offset, uint32_t,
                                absl::Time) {
  data_calls_.fetch_add(1);
  sync::MutexLock lock(&mu_);
  if (offset + count > data_.size()) return absl::OutOfRangeError("past end");
  memset(&data_[offset], 0, count);
  Mark(offset, count, true);
  return absl::OkStatus();
}

absl::Status FakeUpstream::Flush(absl::Time) {
  data_calls_.fetch_add(1);
  return absl::OkStatus();
}

absl::Status FakeUpstream::Cache(uint64_t, uint64_t, absl::Time) {
  data_calls_.fetch_add(1);
  return absl::OkStatus();
}

}  // namespace blockmeta
