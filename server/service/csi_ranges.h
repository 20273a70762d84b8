// server/service/csi_ranges.h — turns blockmeta extents into CSI
// SnapshotMetadata BlockMetadata ranges (transport-free, unit-tested).
//
// Selection: for GetMetadataAllocated (base:allocation) a range is
// reported unless the upstream said it reads as zeroes (NBD_STATE_ZERO):
// a hole that does not read as zeroes (e.g. a qcow2 cluster backed by its
// backing file) still holds data a backup must copy. For GetMetadataDelta
// (qemu:dirty-bitmap:NAME) a range is reported when it is dirty.
//
// Shapes: VARIABLE_LENGTH merges touching selected extents into maximal
// ranges; FIXED_LENGTH reports every block_size-aligned block that
// overlaps a selected extent (rounding outward never loses data), each
// block once. Ranges are strictly increasing and never overlap.
#ifndef BLOCKMETA_SERVER_SERVICE_CSI_RANGES_H_
#define BLOCKMETA_SERVER_SERVICE_CSI_RANGES_H_

#include <cstdint>
#include <deque>

#include "server/cache/extent.h"

namespace blockmeta {

struct CsiRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  friend bool operator==(const CsiRange& a, const CsiRange& b) {
    return a.offset == b.offset && a.length == b.length;
  }
};

class CsiRangeBuilder {
 public:
  enum class Select { kAllocated, kDirty };

  // block_size 0 = VARIABLE_LENGTH; otherwise FIXED_LENGTH blocks of that
  // size. capacity clips the last fixed block.
  CsiRangeBuilder(Select select, uint64_t block_size, uint64_t capacity)
      : select_(select), block_size_(block_size), capacity_(capacity) {}

  // Feed extents in increasing, contiguous order.
  void Add(const Extent& e);
  // Ranges that can no longer change (a later Add cannot merge into them).
  // With `final`, also the one still open.
  size_t Ready(bool final) const {
    return ranges_.size() + ((final && open_) ? 1 : 0);
  }
  // Removes and returns up to `max` ready ranges.
  std::deque<CsiRange> Take(size_t max, bool final);

 private:
  bool Selected(const Extent& e) const;
  void Emit(uint64_t start, uint64_t end);

  const Select select_;
  const uint64_t block_size_;
  const uint64_t capacity_;
  std::deque<CsiRange> ranges_;  // closed ranges
  bool open_ = false;            // `current_` may still grow
  CsiRange current_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_CSI_RANGES_H_
