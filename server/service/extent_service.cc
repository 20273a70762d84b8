// server/service/extent_service.cc — see extent_service.h.
#include "server/service/extent_service.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/quote.h"

namespace blockmeta {
namespace {

namespace v1 = ::blockmeta::v1;

constexpr size_t kMaxContextNameBytes = 4096;

v1::CacheOutcome OutcomeToProto(Outcome o) {
  switch (o) {
    case Outcome::kHit:
      return v1::CACHE_OUTCOME_HIT;
    case Outcome::kPartial:
      return v1::CACHE_OUTCOME_PARTIAL;
    case Outcome::kMiss:
      return v1::CACHE_OUTCOME_MISS;
    case Outcome::kBypass:
      return v1::CACHE_OUTCOME_BYPASS;
  }
  return v1::CACHE_OUTCOME_UNSPECIFIED;
}

// Appends `e` to `out`, merging with the last extent when contiguous and
// equal-flagged and `coalesce` is set.
void AppendExtent(ExtentList* out, const Extent& e, bool coalesce) {
  if (coalesce && !out->empty() && out->back().end() == e.offset &&
      out->back().flags == e.flags) {
    out->back().length += e.length;
    return;
  }
  out->push_back(e);
}

absl::Status ValidateContextName(const std::string& context) {
  if (context.size() > kMaxContextNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metadata context name ", QuoteBounded(context), " is ", context.size(),
        " bytes; the limit is ", kMaxContextNameBytes));
  }
  size_t colon = context.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == context.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed metadata context ", QuoteBounded(context),
                     ": expected NAMESPACE:LEAF such as base:allocation or "
                     "qemu:dirty-bitmap:NAME"));
  }
  for (unsigned char c : context) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "metadata context names must be printable ASCII");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RemovedError(const std::string& export_name) {
  return absl::NotFoundError(
      absl::StrCat("export ", QuoteBounded(export_name),
                   " was removed while this call was in flight"));
}

void ToProto(const Extent& e, const std::string& context, v1::Extent* out) {
  out->set_offset(e.offset);
  out->set_length(e.length);
  out->set_nbd_flags(e.flags);
  if (IsDirtyBitmapContext(context)) {
    out->set_dirty((e.flags & kStateDirty) != 0);
  } else if (context == kBaseAllocation) {
    out->set_hole((e.flags & kStateHole) != 0);
    out->set_zero((e.flags & kStateZero) != 0);
  }
}

ExtentService::ExtentService(const ExportRegistry* registry, ExtentCache* cache,
                             Options options)
    : registry_(registry), cache_(cache), options_(std::move(options)) {}

absl::StatusOr<ExportRef> ExtentService::FindExport(
    const std::string& name) const {
  if (name.empty()) {
    return absl::InvalidArgumentError("export_name is required");
  }
  if (name.size() > kMaxExportNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("export_name ", QuoteBounded(name), " is ", name.size(),
                     " bytes; the limit is ", kMaxExportNameBytes));
  }
  ExportRef entry = registry_->Find(name);
  if (entry == nullptr) {
    std::vector<std::string> names;
    for (const ExportRef& e : registry_->All()) {
      if (names.size() == 20) {  // bounded: there may be thousands
        names.push_back("...");
        break;
      }
      names.push_back(e->config.name());
    }
    return absl::NotFoundError(absl::StrCat(
        "no export named ", QuoteBounded(name),
        "; exports: ", names.empty() ? "(none)" : absl::StrJoin(names, ", ")));
  }
  return entry;
}

absl::StatusOr<std::vector<ExportRef>> ExtentService::ExportsNamed(
    const std::string& name) const {
  if (name.empty()) return registry_->All();
  absl::StatusOr<ExportRef> e = FindExport(name);
  if (!e.ok()) return e.status();
  return std::vector<ExportRef>{*e};
}

absl::StatusOr<v1::ListExportsResponse> ExtentService::ListExports() const {
  v1::ListExportsResponse response;
  for (const ExportRef& e : registry_->All()) {
    v1::ExportSummary* s = response.add_exports();
    s->set_name(e->config.name());
    s->set_description(e->config.description());
    bool ready = e->upstream->Ready();
    s->set_state(ready ? v1::EXPORT_STATE_READY : v1::EXPORT_STATE_UNAVAILABLE);
    absl::StatusOr<UpstreamInfo> info = e->upstream->Info();
    if (info.ok()) s->set_size(info->size);
  }
  return response;
}

absl::StatusOr<v1::ExportInfo> ExtentService::GetExportInfo(
    const v1::GetExportInfoRequest& request) const {
  absl::StatusOr<ExportRef> entry = FindExport(request.export_name());
  if (!entry.ok()) return entry.status();
  const ExportEntry& e = **entry;
  v1::ExportInfo out;
  out.set_name(e.config.name());
  out.set_description(e.config.description());
  out.set_immutable(e.config.immutable());
  out.set_stored(!e.upstream->Stats().store_identity.empty());
  bool ready = e.upstream->Ready();
  out.set_state(ready ? v1::EXPORT_STATE_READY : v1::EXPORT_STATE_UNAVAILABLE);
  out.set_last_error(e.upstream->LastError());
  absl::StatusOr<UpstreamInfo> info = e.upstream->Info();
  if (!info.ok()) {
    // Still useful: say what we know and why the rest is missing.
    if (out.last_error().empty()) {
      out.set_last_error(std::string(info.status().message()));
    }
    return out;
  }
  out.set_size(info->size);
  out.set_minimum_block_size(info->minimum_block_size);
  out.set_preferred_block_size(info->preferred_block_size);
  out.set_maximum_block_size(info->maximum_block_size);
  out.set_read_only(info->read_only || e.config.read_only() ||
                    e.config.immutable());
  out.set_can_trim(info->can_trim);
  out.set_can_zero(info->can_zero);
  out.set_can_flush(info->can_flush);
  out.set_can_fua(info->can_fua);
  out.set_can_multi_conn(info->can_multi_conn);
  out.set_can_cache(info->can_cache);
  for (const std::string& c : info->contexts) out.add_metadata_contexts(c);
  out.set_upstream(info->description);
  return out;
}

absl::StatusOr<ExtentService::Query> ExtentService::Validate(
    const std::string& export_name, const std::string& context_in,
    uint64_t offset, uint64_t length, bool length_zero_means_end,
    uint32_t max_extents, v1::CacheMode mode) const {
  absl::StatusOr<ExportRef> entry = FindExport(export_name);
  if (!entry.ok()) return entry.status();
  if (!v1::CacheMode_IsValid(mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown cache_mode ", static_cast<int>(mode)));
  }
  std::string context =
      context_in.empty() ? std::string(kBaseAllocation) : context_in;
  if (absl::Status s = ValidateContextName(context); !s.ok()) return s;
  if (length == 0 && !length_zero_means_end) {
    return absl::InvalidArgumentError("length must be greater than 0");
  }
  if (length != 0 && offset + length < offset) {
    return absl::InvalidArgumentError(
        absl::StrCat("offset ", offset, " + length ", length,
                     " overflows a 64-bit byte address"));
  }
  absl::StatusOr<UpstreamInfo> info = (*entry)->upstream->Info();
  if (!info.ok()) {
    std::string why = (*entry)->upstream->LastError();
    return absl::UnavailableError(absl::StrCat(
        "export \"", export_name, "\" is not connected to its upstream",
        why.empty() ? std::string() : absl::StrCat(": ", why)));
  }
  // Mapping a whole empty export is an empty (complete) answer, not an
  // error; any other offset at or past the end is OUT_OF_RANGE.
  const bool whole_empty_export =
      info->size == 0 && offset == 0 && length_zero_means_end && length == 0;
  if (offset >= info->size && !whole_empty_export) {
    return absl::OutOfRangeError(
        absl::StrCat("offset ", offset, " is at or past the end of export \"",
                     export_name, "\" (size ", info->size, ")"));
  }
  if (std::find(info->contexts.begin(), info->contexts.end(), context) ==
      info->contexts.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "export \"", export_name, "\" does not offer metadata context \"",
        context, "\"; it offers: ",
        info->contexts.empty() ? "(none)"
                               : absl::StrJoin(info->contexts, ", ")));
  }
  Query q;
  q.entry = *entry;
  q.key = CacheKey{export_name, context};
  q.export_size = info->size;
  q.offset = offset;
  uint64_t remaining = info->size - offset;
  q.end = (length == 0 || length > remaining) ? info->size : offset + length;
  uint32_t max = max_extents == 0 ? options_.default_max_extents : max_extents;
  q.max_extents = std::min(max, options_.max_extents_cap);
  q.cache_mode = mode == v1::CACHE_MODE_UNSPECIFIED ? v1::CACHE_MODE_USE : mode;
  return q;
}

absl::StatusOr<ExtentService::Query> ExtentService::PrepareExtents(
    const v1::GetExtentsRequest& request) const {
  absl::StatusOr<Query> q =
      Validate(request.export_name(), request.context(), request.offset(),
               request.length(), /*length_zero_means_end=*/false,
               request.max_extents(), request.cache_mode());
  if (q.ok() && request.one_extent()) q->max_extents = 1;
  return q;
}

absl::StatusOr<ExtentService::Cursor> ExtentService::PrepareMap(
    const v1::MapExtentsRequest& request) const {
  absl::StatusOr<Cursor> c =
      PrepareStream(request.export_name(), request.context(), request.offset(),
                    request.length(), request.batch_size());
  if (!c.ok()) return c.status();
  if (!v1::CacheMode_IsValid(request.cache_mode())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown cache_mode ", static_cast<int>(request.cache_mode())));
  }
  if (request.cache_mode() != v1::CACHE_MODE_UNSPECIFIED) {
    c->query.cache_mode = request.cache_mode();
  }
  c->coalesce = request.coalesce();
  return c;
}

absl::StatusOr<ExtentService::Cursor> ExtentService::PrepareStream(
    const std::string& export_name, const std::string& context, uint64_t offset,
    uint64_t length, uint32_t batch_size) const {
  absl::StatusOr<Query> q =
      Validate(export_name, context, offset, length,
               /*length_zero_means_end=*/true, batch_size, v1::CACHE_MODE_USE);
  if (!q.ok()) return q.status();
  Cursor c;
  c.query = *std::move(q);
  return c;
}

v1::GetExtentsResponse ExtentService::MakeResponse(
    const Query& query, const LookupResult& r) const {
  v1::GetExtentsResponse response;
  response.mutable_extents()->Reserve(static_cast<int>(r.extents.size()));
  for (const Extent& e : r.extents) {
    ToProto(e, query.key.context, response.add_extents());
  }
  response.set_next_offset(r.next_offset);
  response.set_export_size(query.export_size);
  response.set_context(query.key.context);
  response.set_cache_outcome(OutcomeToProto(r.outcome));
  return response;
}

std::optional<v1::GetExtentsResponse> ExtentService::TryAnswerFromCache(
    const Query& query) {
  if (query.cache_mode != v1::CACHE_MODE_USE) return std::nullopt;
  LookupResult r = cache_->Lookup(query.key, query.offset,
                                  query.end - query.offset, query.max_extents);
  bool complete =
      r.next_offset >= query.end ||
      (query.max_extents != 0 && r.extents.size() >= query.max_extents);
  if (r.extents.empty() || !complete) return std::nullopt;
  // Count the hit now that we know it is one (the probe above was silent).
  r.outcome = Outcome::kHit;
  cache_->Record(query.key, query.offset, r);
  return MakeResponse(query, r);
}

absl::StatusOr<ExtentList> ExtentService::FetchFromUpstream(
    const Query& query, uint64_t offset, uint64_t length, absl::Time deadline) {
  absl::Time start = absl::Now();
  tls_answered_from_store = false;
  absl::StatusOr<ExtentList> got = query.entry->upstream->BlockStatus(
      query.key.context, offset, length, deadline);
  // The cache counts every upstream call, its own and this bypassing one
  // (GetStats takes the store's hits out again).
  cache_->RecordUpstreamCall(query.key, got.status());
  if (options_.on_upstream_call && !tls_answered_from_store) {
    options_.on_upstream_call(query.key.export_name, absl::Now() - start,
                              got.status());
  }
  return got;
}

AsyncFetcher ExtentService::MakeFetcher(const Query& query) const {
  // The cache keeps copies of the fetcher after the call (read-ahead,
  // detached fetches), so it holds what it uses: the export's state and a
  // weak reference to its upstream, locked per fetch. A fetch for an
  // export that was removed fails at once and never reaches the upstream;
  // a removed export's upstream is never kept alive by the cache.
  return [upstream = std::weak_ptr<Upstream>(query.entry->upstream),
          shared = query.entry->shared, context = query.key.context,
          name = query.key.export_name, observer = options_.on_upstream_call](
             uint64_t offset, uint64_t length, FetchDone done) {
    std::shared_ptr<Upstream> up = upstream.lock();
    if (up == nullptr || shared->removed.load()) {
      return std::move(done)(RemovedError(name));
    }
    const absl::Time start = absl::Now();
    up->AsyncBlockStatus(context, offset, length,
                         [done = std::move(done), observer, name,
                          start](absl::StatusOr<ExtentList> got) mutable {
                           // Not for answers from the store.
                           if (observer && !tls_answered_from_store)
                             observer(name, absl::Now() - start, got.status());
                           std::move(done)(std::move(got));
                         });
  };
}

absl::StatusOr<LookupResult> ExtentService::BypassStep(const Query& query,
                                                       uint64_t pos,
                                                       size_t want,
                                                       absl::Time deadline) {
  absl::StatusOr<ExtentList> got = FetchFromUpstream(
      query, pos, std::min(query.end - pos, kMaxNbdRequestLength), deadline);
  if (!got.ok()) return got.status();
  LookupResult r;
  for (const Extent& e : *got) {
    if (e.offset >= query.end) break;
    Extent clipped = e;
    clipped.length = std::min(e.end(), query.end) - e.offset;
    r.extents.push_back(clipped);
    if (want != 0 && r.extents.size() >= want) break;
  }
  r.next_offset = r.extents.empty() ? pos : r.extents.back().end();
  r.outcome = Outcome::kBypass;
  return r;
}

absl::StatusOr<LookupResult> ExtentService::Collect(const Query& query,
                                                    uint64_t offset,
                                                    size_t max_extents,
                                                    bool coalesce,
                                                    absl::Time deadline) {
  LookupResult out;
  out.next_offset = offset;
  bool used_cache = false, used_upstream = false;
  uint64_t pos = offset;
  AsyncFetcher fetch;  // made on the first cache step
  while (pos < query.end &&
         (max_extents == 0 || out.extents.size() < max_extents)) {
    if (absl::Now() >= deadline && !out.extents.empty()) break;
    size_t want = max_extents == 0 ? 0 : max_extents - out.extents.size();
    absl::StatusOr<LookupResult> step;
    if (query.cache_mode == v1::CACHE_MODE_BYPASS) {
      step = BypassStep(query, pos, want, deadline);
    } else {
      if (!fetch) fetch = MakeFetcher(query);
      step = cache_->Get(query.key, query.export_size, pos, query.end - pos,
                         want, fetch, deadline);
    }
    if (!step.ok()) {
      // Stop early with what is known; the caller resumes at next_offset.
      if (!out.extents.empty()) break;
      return step.status();
    }
    if (step->extents.empty() || step->next_offset <= pos) {
      if (!out.extents.empty()) break;
      return absl::InternalError(absl::StrCat("no progress answering export \"",
                                              query.key.export_name,
                                              "\" at offset ", pos));
    }
    switch (step->outcome) {
      case Outcome::kHit:
        used_cache = true;
        break;
      case Outcome::kPartial:
        used_cache = used_upstream = true;
        break;
      case Outcome::kMiss:
      case Outcome::kBypass:
        used_upstream = true;
        break;
    }
    for (const Extent& e : step->extents) {
      AppendExtent(&out.extents, e, coalesce);
    }
    pos = step->next_offset;
  }
  if (max_extents != 0 && out.extents.size() > max_extents) {
    out.extents.resize(max_extents);
  }
  out.next_offset = out.extents.empty() ? offset : out.extents.back().end();
  if (query.cache_mode != v1::CACHE_MODE_BYPASS) {
    out.outcome = used_upstream
                      ? (used_cache ? Outcome::kPartial : Outcome::kMiss)
                      : Outcome::kHit;
  } else {
    out.outcome = Outcome::kBypass;
  }
  return out;
}

absl::StatusOr<v1::GetExtentsResponse> ExtentService::Answer(
    const Query& query, absl::Time deadline) {
  if (query.cache_mode == v1::CACHE_MODE_REFRESH) {
    cache_->Invalidate(query.key, query.offset, query.end - query.offset);
  }
  absl::StatusOr<LookupResult> r = Collect(
      query, query.offset, query.max_extents, /*coalesce=*/true, deadline);
  if (!r.ok()) {
    if (query.entry->removed()) return RemovedError(query.key.export_name);
    return r.status();
  }
  return MakeResponse(query, *r);
}

absl::StatusOr<ExtentService::Batch> ExtentService::NextBatch(
    Cursor* cursor, absl::Time deadline) {
  Query& q = cursor->query;
  Batch batch;
  if (q.entry->removed()) return RemovedError(q.key.export_name);
  if (q.offset >= q.end) {
    batch.next_offset = q.end;
    batch.done = true;
    return batch;
  }
  if (q.cache_mode == v1::CACHE_MODE_REFRESH && !cursor->refreshed) {
    cache_->Invalidate(q.key, q.offset, q.end - q.offset);
    cursor->refreshed = true;
  }
  // The mode for the remaining batches: a refreshed range is then USE.
  Query step = q;
  if (step.cache_mode == v1::CACHE_MODE_REFRESH) {
    step.cache_mode = v1::CACHE_MODE_USE;
  }
  absl::StatusOr<LookupResult> r =
      Collect(step, q.offset, q.max_extents, cursor->coalesce, deadline);
  // Removed meanwhile: the upstream was closed, so whatever this batch
  // waited for failed at once; say why. (A batch that completed is still
  // true and is sent; the next one ends the stream.)
  if (!r.ok() && q.entry->removed()) return RemovedError(q.key.export_name);
  if (!r.ok()) return r.status();
  batch.extents = std::move(r->extents);
  batch.next_offset = r->next_offset;
  batch.outcome = r->outcome;
  q.offset = r->next_offset;
  batch.done = q.offset >= q.end;
  return batch;
}

absl::StatusOr<v1::InvalidateCacheResponse> ExtentService::InvalidateCache(
    const v1::InvalidateCacheRequest& request) {
  if (request.length() != 0 &&
      request.offset() + request.length() < request.offset()) {
    return absl::InvalidArgumentError(
        absl::StrCat("offset ", request.offset(), " + length ",
                     request.length(), " overflows a 64-bit byte address"));
  }
  absl::StatusOr<std::vector<ExportRef>> targets =
      ExportsNamed(request.export_name());
  if (!targets.ok()) return targets.status();
  if (!request.context().empty()) {
    if (absl::Status s = ValidateContextName(request.context()); !s.ok()) {
      return s;
    }
  }
  bool whole = request.offset() == 0 && request.length() == 0;
  const std::vector<CacheKey> keys = cache_->Keys();
  ExtentCache::Dropped total;
  for (const ExportRef& e : *targets) {
    const std::string& name = e->config.name();
    ExtentCache::Dropped d;
    if (!request.context().empty()) {
      // Only keys the cache already has: an arbitrary context name must not
      // create cache state.
      CacheKey key{name, request.context()};
      if (std::find(keys.begin(), keys.end(), key) != keys.end()) {
        d = cache_->Invalidate(key, request.offset(), request.length());
      }
    } else if (whole) {
      d = cache_->InvalidateExport(name);
    } else {
      d = cache_->InvalidateExportRange(name, request.offset(),
                                        request.length());
    }
    total.extents += d.extents;
    total.bytes += d.bytes;
  }
  v1::InvalidateCacheResponse response;
  response.set_extents_dropped(total.extents);
  response.set_bytes_dropped(total.bytes);
  return response;
}

namespace {

// The cache counted every call it made through the upstream, also those
// the store answered: the upstream saw only the misses, plus the calls
// that checked persisted answers at reopen.
CacheCounters WithStore(CacheCounters c, const UpstreamStats::StoreContext& s) {
  c.upstream_calls =
      c.upstream_calls - std::min(c.upstream_calls, s.hits) + s.verify_calls;
  return c;
}

void FillStore(const UpstreamStats::StoreContext& s, v1::CacheCounters* out) {
  out->set_store_hits(out->store_hits() + s.hits);
  out->set_store_misses(out->store_misses() + s.misses);
  out->set_store_writes(out->store_writes() + s.writes);
  out->set_store_extents_read(out->store_extents_read() + s.extents_read);
}

void FillCounters(const CacheCounters& c, v1::CacheCounters* out) {
  out->set_hits(c.hits);
  out->set_partial_hits(c.partial_hits);
  out->set_misses(c.misses);
  out->set_upstream_calls(c.upstream_calls);
  out->set_coalesced_waits(c.coalesced_waits);
  out->set_bytes_from_cache(c.bytes_from_cache);
  out->set_bytes_from_upstream(c.bytes_from_upstream);
  out->set_evictions(c.evictions);
  out->set_invalidations(c.invalidations);
  out->set_stale_fills_dropped(c.stale_fills_dropped);
  out->set_read_ahead_issued(c.read_ahead_issued);
  out->set_read_ahead_hits(c.read_ahead_hits);
  out->set_read_ahead_wasted(c.read_ahead_wasted);
  out->set_detached_waits(c.detached_waits);
  out->set_read_ahead_walks(c.read_ahead_walks);
  out->set_prefetch_issued(c.prefetch_issued);
  out->set_prefetch_bytes(c.prefetch_bytes);
  out->set_prefetch_hits(c.prefetch_hits);
  out->set_prefetch_completed(c.prefetch_completed);
  out->set_prefetch_inflight(c.prefetch_inflight);
  out->set_entries(c.entries);
  out->set_memory_bytes(c.memory_bytes);
}

}  // namespace

absl::StatusOr<v1::GetStatsResponse> ExtentService::GetStats(
    const v1::GetStatsRequest& request) const {
  absl::StatusOr<std::vector<ExportRef>> targets =
      ExportsNamed(request.export_name());
  if (!targets.ok()) return targets.status();
  v1::GetStatsResponse response;
  response.set_memory_limit_bytes(cache_->options().memory_limit_bytes);
  if (options_.fill_store_stats) options_.fill_store_stats(&response);
  // The store's counters are read before the cache's (see WithStore).
  std::vector<ExportRef> all = registry_->All();
  absl::flat_hash_map<std::string, UpstreamStats> upstream;
  for (const ExportRef& e : all)
    upstream[e->config.name()] = e->upstream->Stats();
  auto counters = [&](const CacheKey& k) {
    CacheCounters c = cache_->Counters(k);
    auto u = upstream.find(k.export_name);
    if (u == upstream.end()) return c;
    auto st = u->second.store_contexts.find(k.context);
    return st == u->second.store_contexts.end() ? c : WithStore(c, st->second);
  };
  auto fill_store = [&](const CacheKey& k, v1::CacheCounters* out) {
    auto u = upstream.find(k.export_name);
    if (u == upstream.end()) return;
    auto st = u->second.store_contexts.find(k.context);
    if (st != u->second.store_contexts.end()) FillStore(st->second, out);
  };
  response.set_read_ahead_windows(
      std::min(cache_->options().read_ahead_windows, kMaxReadAheadWindows));
  std::vector<CacheKey> keys = cache_->Keys();
  for (const ExportRef& e : *targets) {
    const std::string& name = e->config.name();
    v1::ExportStats* s = response.add_exports();
    s->set_export_name(name);
    for (const CacheKey& k : keys) {
      if (k.export_name != name) continue;
      v1::CacheCounters* out = &(*s->mutable_contexts())[k.context];
      FillCounters(counters(k), out);
      fill_store(k, out);
    }
    // Every upstream call is counted once, by the cache, per key: the
    // per-export figures are the sum over the export's keys.
    CacheCounters sum;
    for (const CacheKey& k : keys) {
      if (k.export_name == name) sum += counters(k);
    }
    s->set_upstream_calls(sum.upstream_calls);
    s->set_upstream_errors(sum.upstream_errors);
    auto u = upstream.find(name);
    const UpstreamStats st =
        u != upstream.end() ? u->second : e->upstream->Stats();
    s->set_reconnects(st.reconnects);
    s->set_store_identity(st.store_identity);
    s->set_store_bytes(st.store_bytes);
    s->set_store_verify_failures(st.store_verify_failures);
    s->set_prefetch(v1::PrefetchMode_Name(e->config.prefetch()));
    s->set_prefetch_parallel(cache_->ExportPrefetch(name));
    s->set_prefetch_enabled(s->prefetch_parallel() > 0);
    if (s->prefetch_enabled()) {
      response.set_prefetch_exports(response.prefetch_exports() + 1);
    }
  }
  CacheCounters sum;
  v1::CacheCounters* total = response.mutable_total();
  for (const CacheKey& k : keys) {
    if (!request.export_name().empty() &&
        k.export_name != request.export_name()) {
      continue;
    }
    sum += counters(k);
    fill_store(k, total);
  }
  if (request.export_name().empty()) {
    // Gauges and counters of keys already forgotten come from the cache's
    // own total; only the store's share is taken out of it.
    CacheCounters whole = cache_->Counters();
    CacheCounters raw;
    for (const CacheKey& k : keys) raw += cache_->Counters(k);
    whole.upstream_calls = whole.upstream_calls -
                           std::min(whole.upstream_calls, raw.upstream_calls) +
                           sum.upstream_calls;
    sum = whole;
  }
  FillCounters(sum, total);
  return response;
}

}  // namespace blockmeta
