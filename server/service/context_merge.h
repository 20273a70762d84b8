// server/service/context_merge.h — merges the extent streams of several
// metadata contexts of one export (base:allocation, qemu:dirty-bitmap:A,
// ...) into one stream whose extents carry every context's flags.
//
// Invariants:
// * Each input is fed its own extents in increasing, contiguous order from
//   the common start; inputs may be fed in any order and in batches of any
//   size.
// * Output extents are contiguous from the start, have nonzero length, and
//   are split at the union of the inputs' boundaries: over one output
//   extent every input's flags are constant, and output.flags[i] is input
//   i's flags there. With `coalesce`, neighbours whose flags are all equal
//   are merged, so no boundary is kept that no input needs.
// * Output never runs past what every input has covered (the lowest
//   frontier), so no flag is ever guessed (the correctness rule: nothing is
//   reported clean, hole or zero that its context did not say).
// * Memory: only the extents past the lowest frontier are held, plus one
//   open output extent. A caller that always feeds the Lagging() input one
//   batch at a time holds at most one batch per input, never a whole map.
//
// Cost: O(total input extents × inputs) time.
// Thread-safety: none; one owner (a stream's cursor).
#ifndef BLOCKMETA_SERVER_SERVICE_CONTEXT_MERGE_H_
#define BLOCKMETA_SERVER_SERVICE_CONTEXT_MERGE_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "server/cache/extent.h"

namespace blockmeta {

struct MergedExtent {
  uint64_t offset = 0;
  uint64_t length = 0;
  // flags[i]: the NBD status flags of input i over the whole extent.
  absl::InlinedVector<uint32_t, 4> flags;

  uint64_t end() const { return offset + length; }
  friend bool operator==(const MergedExtent& a, const MergedExtent& b) {
    return a.offset == b.offset && a.length == b.length && a.flags == b.flags;
  }
};

class ContextMerge {
 public:
  ContextMerge(size_t inputs, uint64_t start, bool coalesce);

  size_t inputs() const { return pending_.size(); }
  // Appends input i's next extent; it must start at frontier(i).
  // Zero-length extents are ignored.
  void Add(size_t i, const Extent& e);
  // Where input i's known extents end.
  uint64_t frontier(size_t i) const { return frontier_[i]; }
  // The input with the lowest frontier (the one to feed next).
  size_t Lagging() const;
  // The end of the merged extents produced so far or ready: the lowest
  // frontier.
  uint64_t known_end() const { return frontier_[Lagging()]; }

  // Moves up to `max` (0 = no limit) finished output extents to `out`.
  // Without `final` an open (coalescing) extent that a later Add could
  // still grow is held back; with `final` (every input is complete) it is
  // emitted too. Returns the number moved.
  size_t Take(std::vector<MergedExtent>* out, size_t max, bool final);
  // Output extents that Take(max=0, final=false) would return now.
  size_t ready() const { return ready_.size(); }
  // Extents held (pending inputs + ready output), for memory tests.
  size_t held() const;

 private:
  // Turns pending input up to the lowest frontier into output.
  void Advance();
  void Emit(MergedExtent m);

  const bool coalesce_;
  uint64_t pos_;                             // output produced up to here
  std::vector<std::deque<Extent>> pending_;  // per input, past pos_
  std::vector<uint64_t> frontier_;           // per input
  std::deque<MergedExtent> ready_;           // closed output extents
  bool open_ = false;                        // `current_` may still grow
  MergedExtent current_;
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_CONTEXT_MERGE_H_
