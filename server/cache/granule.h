// server/cache/granule.h — GranuleBound: what a write may have changed in
// one (export, context), learned from the upstream's own answers.
//
// NBD does not advertise the granularity at which a context's answers
// change (a dirty bitmap's granularity, up to 2 GiB in qemu; a qcow2
// cluster; a filesystem block), and a sub-granule write changes the
// upstream's answer for the whole granule around it. qemu-nbd never replies
// past the requested length, so asking again over the written bytes does
// not reveal the granule either.
//
// What the answers do reveal: inside one upstream answer, every offset
// where the flags change is a multiple of the true granularity G (bitmap
// bits and qcow2 clusters are aligned to offset 0). So the gcd B of every
// such boundary seen is a multiple of G, and rounding a write out to
// multiples of B covers every granule it touched (B is a multiple of G, so
// floor(a / B) * B <= floor(a / G) * G and the same for the end). B need
// not be a power of two. Not boundaries: an answer's first offset (where
// the request started), its end (request clipping, the export end, an
// upstream's own limit), and offsets where equal flags meet (servers may
// split a run anywhere).
//
// Invariant: bound() is 0 ("unknown": a write forgets the whole context)
// or the gcd of flag-change boundaries observed since the last Reset(), so
// always a multiple of G while G stays the same. The key's owner resets it
// when the upstream may have changed under it (reconnect: a bitmap may be
// re-created with another granularity).
//
// Caveat, why callers keep a floor: a context whose answers change in a
// unit coarser than their finest boundary (base:allocation of a qcow2 image
// over a sparse file: a write allocates a whole 64 KiB cluster, while host
// holes inside allocated clusters show 4 KiB boundaries) is only covered
// by the floor the caller rounds to first (the cluster size, or the shim's
// 2 MiB default). Dirty bitmaps change exactly per bit, so for them the
// learned bound alone is exact.
//
// Cost: Observe is one modulo per flag change (a gcd step only when the
// bound shrinks); RoundOut is two divisions. Not thread-safe: the owner
// guards it (ExtentCache: the key's mutex).
#ifndef BLOCKMETA_SERVER_CACHE_GRANULE_H_
#define BLOCKMETA_SERVER_CACHE_GRANULE_H_

#include <cstdint>
#include <limits>
#include <utility>

#include "absl/types/span.h"
#include "server/cache/extent.h"

namespace blockmeta {

class GranuleBound {
 public:
  static constexpr uint64_t kEverything = std::numeric_limits<uint64_t>::max();

  // Learns from one validated upstream answer (contiguous, nonempty
  // extents): the offsets where the flags change between neighbours,
  // strictly below `below` (the caller's poison mark: nothing is learned
  // from a part of an answer that a reset may have outdated).
  void Observe(absl::Span<const Extent> answer, uint64_t below = kEverything);

  // Forgets what was learned.
  void Reset() { bound_ = 0; }

  // 0 when unknown, else the gcd of the boundaries seen.
  uint64_t bound() const { return bound_; }

  // [begin, end) rounded out to multiples of bound(), the end saturating at
  // kEverything; {0, kEverything} (the whole context) while unknown.
  std::pair<uint64_t, uint64_t> RoundOut(uint64_t begin, uint64_t end) const;

 private:
  uint64_t bound_ = 0;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_GRANULE_H_
