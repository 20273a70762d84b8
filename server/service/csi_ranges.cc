// server/service/csi_ranges.cc — see csi_ranges.h.
#include "server/service/csi_ranges.h"

#include <algorithm>

namespace blockmeta {

bool CsiRangeBuilder::Selected(const Extent& e) const {
  if (select_ == Select::kDirty) return (e.flags & kStateDirty) != 0;
  return (e.flags & kStateZero) == 0;
}

void CsiRangeBuilder::Emit(uint64_t start, uint64_t end) {
  // `start` only grows across calls; merge into the open range if touching.
  if (open_ && start <= current_.offset + current_.length) {
    uint64_t cur_end = current_.offset + current_.length;
    current_.length = std::max(cur_end, end) - current_.offset;
    return;
  }
  if (open_) ranges_.push_back(current_);
  current_ = CsiRange{start, end - start};
  open_ = true;
}

void CsiRangeBuilder::Add(const Extent& e) {
  if (e.length == 0 || !Selected(e)) return;
  if (block_size_ == 0) {
    Emit(e.offset, e.end());
    return;
  }
  // Fixed length: one range per block; blocks already emitted are skipped.
  uint64_t first = e.offset / block_size_ * block_size_;
  for (uint64_t b = first; b < e.end(); b += block_size_) {
    uint64_t end = std::min(b + block_size_, capacity_);
    if (open_ && b < current_.offset + current_.length) continue;  // seen
    if (open_) ranges_.push_back(current_);
    current_ = CsiRange{b, end - b};
    open_ = true;
  }
}

std::deque<CsiRange> CsiRangeBuilder::Take(size_t max, bool final) {
  if (final && open_) {
    ranges_.push_back(current_);
    open_ = false;
  }
  std::deque<CsiRange> out;
  while (!ranges_.empty() && (max == 0 || out.size() < max)) {
    out.push_back(ranges_.front());
    ranges_.pop_front();
  }
  return out;
}

}  // namespace blockmeta
