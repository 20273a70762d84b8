// server/service/totals.cc — see totals.h.
#include "server/service/totals.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

v1::CacheOutcome CombinedOutcome(const MultiCursor& m) {
  if (m.bypass) return v1::CACHE_OUTCOME_BYPASS;
  if (!m.used_upstream) return v1::CACHE_OUTCOME_HIT;
  return m.used_cache ? v1::CACHE_OUTCOME_PARTIAL : v1::CACHE_OUTCOME_MISS;
}

// One context: its cursor's next batch, straight into the sums.
absl::StatusOr<bool> StepOne(ExtentService* service, TotalsCursor* c,
                             absl::Time deadline) {
  MultiCursor& m = c->walk;
  absl::StatusOr<ExtentService::Batch> b =
      service->NextBatch(&m.inputs.front(), deadline);
  if (!b.ok()) return b.status();
  switch (b->outcome) {
    case Outcome::kHit:
      m.used_cache = true;
      break;
    case Outcome::kPartial:
      m.used_cache = m.used_upstream = true;
      break;
    case Outcome::kMiss:
      m.used_upstream = true;
      break;
    case Outcome::kBypass:
      m.bypass = m.used_upstream = true;
      break;
  }
  for (const Extent& e : b->extents) c->sums.Add(e.length, {&e.flags, 1});
  m.offset = b->next_offset;
  return b->done;
}

// Several contexts: the next merged batch.
absl::StatusOr<bool> StepMerged(ExtentService* service, TotalsCursor* c,
                                absl::Time deadline) {
  absl::StatusOr<MergedBatch> b = NextMerged(service, &c->walk, deadline);
  if (!b.ok()) return b.status();
  for (const MergedExtent& e : b->extents) c->sums.Add(e.length, e.flags);
  return b->done;
}

// How early a slice's timed wait may end and still count as the slice's
// end (TotalsStep).
constexpr absl::Duration kSliceEndSlack = absl::Milliseconds(50);

}  // namespace

TotalsAccumulator::TotalsAccumulator(std::vector<std::string> contexts) {
  sums_.resize(contexts.size());
  for (size_t i = 0; i < contexts.size(); ++i) {
    Sums& s = sums_[i];
    s.context = std::move(contexts[i]);
    if (s.context == kBaseAllocation) {
      s.kind = Kind::kAllocation;
      allocation_ = static_cast<int>(i);
    } else if (IsDirtyBitmapContext(s.context)) {
      s.kind = Kind::kDirtyBitmap;
    }
  }
}

void TotalsAccumulator::Add(uint64_t length, absl::Span<const uint32_t> flags) {
  if (length == 0) return;
  // A new merged run when any context's flags change.
  bool new_run = merged_extents_ == 0;
  const uint32_t alloc =
      allocation_ >= 0 ? flags[static_cast<size_t>(allocation_)] : 0;
  for (size_t i = 0; i < sums_.size(); ++i) {
    Sums& s = sums_[i];
    const uint32_t f = flags[i];
    if (!s.have_last || s.last_flags != f) {
      ++s.extents;
      new_run = true;
    }
    s.have_last = true;
    s.last_flags = f;
    switch (s.kind) {
      case Kind::kAllocation:
        ((f & kStateHole) != 0 ? s.hole : s.data) += length;
        ((f & kStateZero) != 0 ? s.zero : s.nonzero) += length;
        break;
      case Kind::kDirtyBitmap:
        if ((f & kStateDirty) == 0) {
          s.clean += length;
          break;
        }
        s.dirty += length;
        if ((alloc & kStateHole) == 0) s.dirty_data += length;
        if ((alloc & kStateZero) == 0) s.dirty_nonzero += length;
        break;
      case Kind::kOther:
        break;
    }
    auto it = std::find_if(s.by_flags.begin(), s.by_flags.end(),
                           [f](const auto& p) { return p.first == f; });
    if (it != s.by_flags.end()) {
      it->second += length;
    } else if (s.by_flags.size() < kMaxFlagValues) {
      s.by_flags.emplace_back(f, length);
    } else {
      s.by_flags_truncated = true;
    }
  }
  if (new_run) ++merged_extents_;
}

void TotalsAccumulator::Fill(v1::GetTotalsResponse* response) const {
  for (const Sums& s : sums_) {
    v1::ContextTotals* t = response->add_contexts();
    t->set_context(s.context);
    t->set_extents(s.extents);
    switch (s.kind) {
      case Kind::kAllocation:
        t->set_data(s.data);
        t->set_hole(s.hole);
        t->set_zero(s.zero);
        t->set_nonzero(s.nonzero);
        break;
      case Kind::kDirtyBitmap:
        t->set_dirty(s.dirty);
        t->set_clean(s.clean);
        if (allocation_ >= 0) {
          t->set_dirty_data(s.dirty_data);
          t->set_dirty_nonzero(s.dirty_nonzero);
        }
        break;
      case Kind::kOther:
        break;
    }
    auto sorted = s.by_flags;
    std::sort(sorted.begin(), sorted.end());
    for (const auto& [flags, bytes] : sorted) {
      v1::FlagsTotal* f = t->add_by_flags();
      f->set_flags(flags);
      f->set_bytes(bytes);
    }
    t->set_by_flags_truncated(s.by_flags_truncated);
  }
}

absl::StatusOr<TotalsCursor> PrepareTotals(const ExtentService& service,
                                           const v1::GetTotalsRequest& r) {
  v1::MapExtentsRequest walk;
  walk.set_export_name(r.export_name());
  walk.set_offset(r.offset());
  walk.set_length(r.length());
  walk.set_cache_mode(r.cache_mode());
  // Extents per step and context: 4096 keeps each batch's vector (96 KiB)
  // under glibc's mmap threshold; 65536 (1.5 MiB, mapped and unmapped per
  // batch) made a warm walk spend a third of its time in page faults.
  walk.set_batch_size(kTotalsBatchExtents);
  walk.set_coalesce(true);
  if (r.contexts().empty()) {
    walk.add_contexts(std::string(kBaseAllocation));
  } else {
    *walk.mutable_contexts() = r.contexts();
  }
  absl::StatusOr<MultiCursor> m = PrepareMultiMap(service, walk);
  if (!m.ok()) return m.status();
  std::vector<std::string> names = m->contexts;
  const uint64_t start = m->offset;
  return TotalsCursor{*std::move(m), TotalsAccumulator(std::move(names)),
                      start};
}

absl::Status TotalsDeadlineStatus(const TotalsCursor& c) {
  const uint64_t done = c.position() - c.start;
  return absl::DeadlineExceededError(absl::StrCat(
      "deadline exceeded totalling export \"", c.export_name().substr(0, 256),
      "\": ", done, " of ", c.walk.end - c.start, " bytes from offset ",
      c.start,
      " walked; what the upstream answered stays cached, so a call with a "
      "longer deadline (or a smaller range) resumes faster"));
}

absl::StatusOr<bool> TotalsStep(ExtentService* service, TotalsCursor* c,
                                absl::Time deadline, absl::Time slice_end) {
  // BYPASS waits for each upstream answer itself (nothing runs on detached
  // and nothing is cached): slicing would throw answers away.
  const bool bypass =
      c->walk.inputs.front().query.cache_mode == v1::CACHE_MODE_BYPASS;
  const absl::Time step_deadline =
      bypass ? deadline : std::min(deadline, slice_end);
  absl::StatusOr<bool> done = c->walk.inputs.size() == 1
                                  ? StepOne(service, c, step_deadline)
                                  : StepMerged(service, c, step_deadline);
  if (done.ok() ||
      done.status().code() != absl::StatusCode::kDeadlineExceeded) {
    return done;
  }
  const absl::Time now = absl::Now();
  // A timed wait may end a little before its deadline by this clock
  // (absl::Now() interpolates the cycle counter; the wait's timeout is the
  // kernel's), so "about now" counts as the deadline.
  if (now + kSliceEndSlack >= deadline) return TotalsDeadlineStatus(*c);
  // The slice ended while waiting for a fetch; the fetch runs on detached
  // and the next step waits for it (single-flight).
  if (now + kSliceEndSlack >= step_deadline) return false;
  return done.status();  // an upstream's own timeout
}

v1::GetTotalsResponse TotalsResponse(const TotalsCursor& c) {
  v1::GetTotalsResponse r;
  r.set_export_name(c.export_name());
  r.set_export_size(c.walk.export_size);
  r.set_offset(c.start);
  r.set_length(c.walk.end - c.start);
  c.sums.Fill(&r);
  r.set_extents(c.sums.merged_extents());
  r.set_cache_outcome(CombinedOutcome(c.walk));
  return r;
}

absl::StatusOr<v1::GetTotalsResponse> ComputeTotals(ExtentService* service,
                                                    TotalsCursor* cursor,
                                                    absl::Time deadline) {
  while (true) {
    if (absl::Now() >= deadline) return TotalsDeadlineStatus(*cursor);
    absl::StatusOr<bool> done =
        TotalsStep(service, cursor, deadline, absl::InfiniteFuture());
    if (!done.ok()) return done.status();
    if (*done) return TotalsResponse(*cursor);
  }
}

}  // namespace blockmeta
