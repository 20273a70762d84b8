// server/cache/extent.h — the extent value type shared by every component.
//
// An Extent is a run of bytes with one set of NBD status flags for one
// metadata context. Flags are the raw NBD bits: for base:allocation bit 0 is
// HOLE and bit 1 is ZERO; for qemu:dirty-bitmap:* bit 0 is DIRTY. Flags 0 is
// always the safe answer ("data" / "clean" is NOT safe for bitmaps: for a
// dirty bitmap the safe answer is DIRTY, see SafeFlags()).
#ifndef BLOCKMETA_SERVER_CACHE_EXTENT_H_
#define BLOCKMETA_SERVER_CACHE_EXTENT_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace blockmeta {

inline constexpr std::string_view kBaseAllocation = "base:allocation";
inline constexpr std::string_view kDirtyBitmapPrefix = "qemu:dirty-bitmap:";

// base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO).
inline constexpr uint32_t kStateHole = 1u << 0;
inline constexpr uint32_t kStateZero = 1u << 1;
// qemu:dirty-bitmap:* flag (NBD_STATE_DIRTY).
inline constexpr uint32_t kStateDirty = 1u << 0;

// NBD without extended headers: one request covers at most 2^32 - 1 bytes.
inline constexpr uint64_t kMaxNbdRequestLength = 0xffffffffu;

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;  // never 0 in a well-formed answer
  uint32_t flags = 0;

  uint64_t end() const { return offset + length; }
  friend bool operator==(const Extent& a, const Extent& b) {
    return a.offset == b.offset && a.length == b.length && a.flags == b.flags;
  }
  friend bool operator!=(const Extent& a, const Extent& b) { return !(a == b); }
  friend std::ostream& operator<<(std::ostream& os, const Extent& e) {
    return os << "{" << e.offset << "+" << e.length << " f=" << e.flags << "}";
  }
};

using ExtentList = std::vector<Extent>;

inline bool IsDirtyBitmapContext(std::string_view context) {
  return context.substr(0, kDirtyBitmapPrefix.size()) == kDirtyBitmapPrefix;
}

// The answer that can never lose data when nothing is known: data for
// base:allocation, dirty for a dirty bitmap.
inline uint32_t SafeFlags(std::string_view context) {
  return IsDirtyBitmapContext(context) ? kStateDirty : 0;
}

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_EXTENT_H_
