// server/cache/granule.cc — see granule.h.
#include "server/cache/granule.h"

#include <numeric>

namespace blockmeta {

void GranuleBound::Observe(absl::Span<const Extent> answer, uint64_t below) {
  for (size_t i = 1; i < answer.size(); ++i) {
    const uint64_t b = answer[i].offset;
    if (b >= below) break;
    if (answer[i].flags == answer[i - 1].flags) continue;
    // gcd(0, b) == b: the first boundary seeds the bound.
    if (bound_ == 0 || b % bound_ != 0) bound_ = std::gcd(bound_, b);
  }
}

std::pair<uint64_t, uint64_t> GranuleBound::RoundOut(uint64_t begin,
                                                     uint64_t end) const {
  if (bound_ == 0) return {0, kEverything};
  const uint64_t b = begin - begin % bound_;
  const uint64_t rem = end % bound_;
  uint64_t e = end;
  if (rem != 0) {
    e = end > kEverything - (bound_ - rem) ? kEverything : end + (bound_ - rem);
  }
  return {b, e};
}

}  // namespace blockmeta
