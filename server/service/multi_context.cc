// server/service/multi_context.cc — see multi_context.h.
#include "server/service/multi_context.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/quote.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

absl::StatusOr<std::vector<std::string>> ContextNames(
    const std::string& single,
    const google::protobuf::RepeatedPtrField<std::string>& many) {
  if (!single.empty()) {
    return absl::InvalidArgumentError(
        "set either context or contexts, not both");
  }
  if (many.size() > static_cast<int>(kMaxMergedContexts)) {
    return absl::InvalidArgumentError(absl::StrCat(
        many.size(), " contexts asked; at most ", kMaxMergedContexts));
  }
  std::vector<std::string> names;
  for (const std::string& c : many) {
    std::string name = c.empty() ? std::string(kBaseAllocation) : c;
    if (std::find(names.begin(), names.end(), name) != names.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("context ", QuoteBounded(name), " asked twice"));
    }
    names.push_back(std::move(name));
  }
  return names;
}

// One one-context stream per name, from a MapExtents request template.
absl::StatusOr<MultiCursor> Open(const ExtentService& service,
                                 v1::MapExtentsRequest one,
                                 std::vector<std::string> names) {
  MultiCursor m;
  for (const std::string& name : names) {
    one.set_context(name);
    absl::StatusOr<ExtentService::Cursor> c = service.PrepareMap(one);
    if (!c.ok()) return c.status();
    m.inputs.push_back(*std::move(c));
  }
  const ExtentService::Query& q = m.inputs.front().query;
  m.contexts = std::move(names);
  m.input_done.assign(m.inputs.size(), false);
  m.offset = q.offset;
  m.end = q.end;
  m.export_size = q.export_size;
  m.max_extents = q.max_extents;
  m.merge = std::make_unique<ContextMerge>(m.inputs.size(), q.offset,
                                           m.inputs.front().coalesce);
  return m;
}

v1::CacheOutcome Combined(const MultiCursor& m) {
  if (m.bypass) return v1::CACHE_OUTCOME_BYPASS;
  if (!m.used_upstream) return v1::CACHE_OUTCOME_HIT;
  return m.used_cache ? v1::CACHE_OUTCOME_PARTIAL : v1::CACHE_OUTCOME_MISS;
}

}  // namespace

absl::StatusOr<MultiCursor> PrepareMultiExtents(
    const ExtentService& service, const v1::GetExtentsRequest& r) {
  absl::StatusOr<std::vector<std::string>> names =
      ContextNames(r.context(), r.contexts());
  if (!names.ok()) return names.status();
  if (r.length() == 0) {
    return absl::InvalidArgumentError("length must be greater than 0");
  }
  v1::MapExtentsRequest one;
  one.set_export_name(r.export_name());
  one.set_offset(r.offset());
  one.set_length(r.length());
  one.set_batch_size(r.max_extents());
  one.set_cache_mode(r.cache_mode());
  one.set_coalesce(true);
  absl::StatusOr<MultiCursor> m = Open(service, one, *std::move(names));
  if (m.ok() && r.one_extent()) m->max_extents = 1;
  return m;
}

absl::StatusOr<MultiCursor> PrepareMultiMap(const ExtentService& service,
                                            const v1::MapExtentsRequest& r) {
  absl::StatusOr<std::vector<std::string>> names =
      ContextNames(r.context(), r.contexts());
  if (!names.ok()) return names.status();
  v1::MapExtentsRequest one = r;
  one.clear_contexts();
  return Open(service, std::move(one), *std::move(names));
}

absl::StatusOr<MergedBatch> NextMerged(ExtentService* service, MultiCursor* m,
                                       absl::Time deadline) {
  ContextMerge& merge = *m->merge;
  auto all_done = [m] {
    return std::all_of(m->input_done.begin(), m->input_done.end(),
                       [](bool d) { return d; });
  };
  while (merge.ready() < m->max_extents && !all_done()) {
    size_t i = merge.Lagging();
    absl::StatusOr<ExtentService::Batch> b =
        service->NextBatch(&m->inputs[i], deadline);
    if (!b.ok()) {
      if (merge.ready() > 0) break;  // report what is known first
      return b.status();
    }
    switch (b->outcome) {
      case Outcome::kHit:
        m->used_cache = true;
        break;
      case Outcome::kPartial:
        m->used_cache = m->used_upstream = true;
        break;
      case Outcome::kMiss:
        m->used_upstream = true;
        break;
      case Outcome::kBypass:
        m->bypass = m->used_upstream = true;
        break;
    }
    for (const Extent& e : b->extents) merge.Add(i, e);
    m->input_done[i] = b->done;
  }
  MergedBatch out;
  const bool final = all_done();
  merge.Take(&out.extents, m->max_extents, final);
  out.next_offset = out.extents.empty() ? m->offset : out.extents.back().end();
  m->offset = out.next_offset;
  out.done = final && merge.ready() == 0 && m->offset >= m->end;
  return out;
}

absl::StatusOr<v1::GetExtentsResponse> AnswerMulti(ExtentService* service,
                                                   MultiCursor* m,
                                                   absl::Time deadline) {
  absl::StatusOr<MergedBatch> b = NextMerged(service, m, deadline);
  if (!b.ok()) return b.status();
  v1::GetExtentsResponse r;
  r.mutable_extents()->Reserve(static_cast<int>(b->extents.size()));
  for (const MergedExtent& e : b->extents) {
    MergedToProto(e, m->contexts, r.add_extents());
  }
  r.set_next_offset(b->next_offset);
  r.set_export_size(m->export_size);
  r.set_context(m->contexts.front());
  for (const std::string& c : m->contexts) r.add_contexts(c);
  r.set_cache_outcome(Combined(*m));
  return r;
}

void MergedToProto(const MergedExtent& e,
                   const std::vector<std::string>& contexts, v1::Extent* out) {
  out->set_offset(e.offset);
  out->set_length(e.length);
  bool dirty_set = false;
  for (size_t i = 0; i < contexts.size(); ++i) {
    const uint32_t f = e.flags[i];
    v1::ContextFlags* cf = out->add_contexts();
    cf->set_nbd_flags(f);
    if (IsDirtyBitmapContext(contexts[i])) {
      cf->set_dirty((f & kStateDirty) != 0);
      if (!dirty_set) out->set_dirty(cf->dirty());
      dirty_set = true;
    } else if (contexts[i] == kBaseAllocation) {
      cf->set_hole((f & kStateHole) != 0);
      cf->set_zero((f & kStateZero) != 0);
      out->set_hole(cf->hole());
      out->set_zero(cf->zero());
    }
  }
  out->set_nbd_flags(e.flags.front());
}

}  // namespace blockmeta
