// server/service/context_merge.cc — see context_merge.h.
#include "server/service/context_merge.h"

#include <algorithm>
#include <utility>

namespace blockmeta {

ContextMerge::ContextMerge(size_t inputs, uint64_t start, bool coalesce)
    : coalesce_(coalesce),
      pos_(start),
      pending_(inputs),
      frontier_(inputs, start) {}

size_t ContextMerge::Lagging() const {
  return static_cast<size_t>(
      std::min_element(frontier_.begin(), frontier_.end()) - frontier_.begin());
}

size_t ContextMerge::held() const {
  size_t n = ready_.size() + (open_ ? 1 : 0);
  for (const auto& p : pending_) n += p.size();
  return n;
}

void ContextMerge::Add(size_t i, const Extent& e) {
  if (e.length == 0) return;
  pending_[i].push_back(e);
  frontier_[i] = e.end();
  Advance();
}

void ContextMerge::Emit(MergedExtent m) {
  if (open_ && coalesce_ && current_.end() == m.offset &&
      current_.flags == m.flags) {
    current_.length += m.length;
    return;
  }
  if (open_) ready_.push_back(std::move(current_));
  current_ = std::move(m);
  open_ = true;
  if (!coalesce_) {
    ready_.push_back(std::move(current_));
    open_ = false;
  }
}

void ContextMerge::Advance() {
  const uint64_t limit = known_end();
  while (pos_ < limit) {
    // Every input has an extent covering pos_ (its frontier is past it).
    uint64_t end = limit;
    MergedExtent m;
    m.offset = pos_;
    m.flags.resize(pending_.size());
    for (size_t i = 0; i < pending_.size(); ++i) {
      const Extent& front = pending_[i].front();
      end = std::min(end, front.end());
      m.flags[i] = front.flags;
    }
    m.length = end - pos_;
    for (auto& p : pending_) {
      if (p.front().end() == end) p.pop_front();
    }
    pos_ = end;
    Emit(std::move(m));
  }
}

size_t ContextMerge::Take(std::vector<MergedExtent>* out, size_t max,
                          bool final) {
  if (final && open_) {
    ready_.push_back(std::move(current_));
    open_ = false;
  }
  size_t n = 0;
  while (!ready_.empty() && (max == 0 || n < max)) {
    out->push_back(std::move(ready_.front()));
    ready_.pop_front();
    ++n;
  }
  return n;
}

}  // namespace blockmeta
