// client/map_commands.cc — see map_commands.h.
#include "client/map_commands.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/extent_format.h"
#include "client/units.h"
#include "common/quote.h"

namespace blockmeta::client {
namespace {

const FlagSpec kTotals{"totals", "",
                       "print bytes per type instead of the extents"};
const FlagSpec kBatch{"batch-size", "N",
                      "extents per streamed message (default: server's)"};
const FlagSpec kProgress{"progress", "WHEN",
                         "progress bar on stderr: auto (default: when stderr "
                         "is a terminal), always or never"};

// Progress bar on stderr: "[#####.....]  45%  1.2 GiB of 2.0 GiB", redrawn
// at most 10 times a second, erased when done.
class ProgressBar {
 public:
  ProgressBar(std::ostream* err, bool enabled) : err_(*err), on_(enabled) {}
  ~ProgressBar() { Clear(); }

  void Update(uint64_t start, uint64_t pos, uint64_t end) {
    if (!on_ || end <= start) return;
    absl::Time now = absl::Now();
    if (drawn_ && now - last_ < absl::Milliseconds(100) && pos < end) return;
    last_ = now;
    double frac =
        static_cast<double>(pos - start) / static_cast<double>(end - start);
    int filled = static_cast<int>(frac * 30);
    err_ << "\r[" << std::string(filled, '#') << std::string(30 - filled, '.')
         << "] " << absl::StrFormat("%3d%%", static_cast<int>(frac * 100))
         << "  " << FormatSize(pos - start) << " of " << FormatSize(end - start)
         << "\033[K" << std::flush;
    drawn_ = true;
  }
  void Clear() {
    if (drawn_) err_ << "\r\033[K" << std::flush;
    drawn_ = false;
  }

 private:
  std::ostream& err_;
  const bool on_;
  bool drawn_ = false;
  absl::Time last_;
};

// map and changed: `changed` maps qemu:dirty-bitmap:--bitmap.
int MapRange(CommandContext& ctx, bool changed) {
  v1::MapExtentsRequest req;
  req.set_export_name(ctx.positional()[0]);
  req.set_coalesce(true);
  if (changed) {
    if (!ctx.Has("bitmap")) return ctx.Usage("missing --bitmap=NAME");
    if (ctx.Get("bitmap").empty()) return ctx.Usage("--bitmap needs a name");
    req.set_context(absl::StrCat("qemu:dirty-bitmap:", ctx.Get("bitmap")));
  } else {
    if (ctx.Has("context") && ctx.Get("context").empty()) {
      return ctx.Usage("--context needs a name");
    }
    std::vector<std::string> contexts =
        absl::StrSplit(ctx.Get("context", kDefaultContext), ',');
    if (contexts.size() > 1) {
      for (const std::string& c : contexts) {
        if (c.empty()) return ctx.Usage("--context: an empty name in the list");
        req.add_contexts(c);
      }
    } else {
      req.set_context(contexts[0]);
    }
  }
  uint64_t offset = 0, length = 0;
  if (auto e = ctx.SizeFlag("offset", &offset)) return ctx.Usage(*e);
  if (auto e = ctx.SizeFlag("length", &length)) return ctx.Usage(*e);
  if (ctx.Has("length") && length == 0) {
    return ctx.Usage("--length must be > 0 (omit it to map to the end)");
  }
  req.set_offset(offset);
  req.set_length(length);
  v1::CacheMode mode = v1::CACHE_MODE_USE;
  if (auto e = ctx.CacheFlag(&mode)) return ctx.Usage(*e);
  req.set_cache_mode(mode);
  int batch = 0;
  if (auto e = ctx.IntFlag("batch-size", 1, 65536, &batch)) {
    return ctx.Usage(*e);
  }
  req.set_batch_size(batch);
  std::string progress = ctx.Get("progress", "auto");
  if (progress != "auto" && progress != "always" && progress != "never") {
    return ctx.Usage(absl::StrCat("--progress: invalid value ",
                                  QuoteBounded(progress),
                                  " (expected auto, always or never)"));
  }
  WriterOptions wo;
  absl::StatusOr<OutputFormat> fmt =
      ParseOutputFormat(ctx.Get("output", "human"));
  if (!fmt.ok()) {
    return ctx.Usage(absl::StrCat("--output: ", fmt.status().message()));
  }
  wo.format = *fmt;
  wo.totals = ctx.Has("totals");
  wo.dirty_only = changed;
  const bool side_by_side =
      wo.format == OutputFormat::kHuman || wo.format == OutputFormat::kJson;
  if (req.contexts_size() > 0 && (!side_by_side || wo.totals)) {
    return ctx.Usage(
        "several contexts side by side need --output=human or json (without "
        "--totals)");
  }
  if (changed && side_by_side && !wo.totals) {
    // The zero information in the same query: whether each changed block
    // reads as zeroes (the bitmap first, so TYPE stays the bitmap's).
    req.add_contexts(req.context());
    req.add_contexts(std::string(kDefaultContext));
    req.clear_context();
  }
  if (wo.format == OutputFormat::kQemuJson &&
      req.context() != "base:allocation") {
    return ctx.Usage(
        "--output=qemu-json describes base:allocation only (qemu-img map "
        "cannot show other contexts)");
  }
  absl::StatusOr<std::unique_ptr<ExtentWriter>> writer =
      MakeExtentWriter(wo, &ctx.out());
  if (!writer.ok()) return ctx.Usage(writer.status().message());

  ProgressBar bar(&ctx.err(), progress == "always" ||
                                  (progress == "auto" && ctx.env().err_is_tty));
  std::unique_ptr<ExtentIterator> it = ctx.client().MapExtents(req);
  bool begun = false;
  v1::Extent e;
  while (true) {
    absl::StatusOr<bool> more = it->Next(&e);
    if (!more.ok()) {
      bar.Clear();
      ctx.out().flush();
      return ctx.Fail("MapExtents", more.status());
    }
    if (!begun) {  // also for an empty export: headers, "[]", totals
      MapHeader h;
      h.export_name = req.export_name();
      h.context = it->context().empty() ? req.context() : it->context();
      h.contexts.assign(req.contexts().begin(), req.contexts().end());
      if (h.context.empty() && !h.contexts.empty()) h.context = h.contexts[0];
      h.offset = offset;
      h.end = it->range_end();
      h.export_size = it->export_size();
      (*writer)->Begin(h);
      begun = true;
    }
    if (!*more) break;
    (*writer)->Add(e);
    bar.Update(offset, it->position(), it->range_end());
  }
  bar.Clear();
  (*writer)->End();
  ctx.out().flush();
  return kExitOk;
}

int RunMap(CommandContext& ctx) { return MapRange(ctx, /*changed=*/false); }
int RunChanged(CommandContext& ctx) { return MapRange(ctx, /*changed=*/true); }

}  // namespace

CommandSpec MapCommand() {
  return {
      "map",
      "EXPORT",
      "map the extents (data, hole, zero) of an export",
      "Formats: human (aligned columns), json (see docs/client.md), "
      "qemu-json (byte-identical to `qemu-img map --output=json`), nbdinfo "
      "(identical to `nbdinfo --map`), csv.",
      1,
      1,
      {{"context", "NAME[,NAME...]",
        absl::StrCat("metadata context (default ", kDefaultContext,
                     "), e.g. qemu:dirty-bitmap:NAME; several, "
                     "comma-separated, are shown side by side (human, "
                     "json)")},
       kOffsetFlag,
       kLengthFlag,
       kTotals,
       {"output", "FORMAT", "human (default), json, qemu-json, nbdinfo or csv"},
       kCacheFlag,
       kBatch,
       kProgress},
      &RunMap};
}

CommandSpec ChangedCommand() {
  return {"changed",
          "EXPORT",
          "map the blocks changed since a dirty bitmap (checkpoint) was made",
          "Maps the context qemu:dirty-bitmap:NAME. The human format lists "
          "only the dirty ranges, with a ZERO column (the block reads as "
          "zeroes: write zeroes, do not copy); json carries dirty and zero per "
          "extent, like imageio's dirty extents (both ask base:allocation in "
          "the same query); nbdinfo is identical to `nbdinfo "
          "--map=qemu:dirty-bitmap:NAME`.",
          1,
          1,
          {{"bitmap", "NAME", "the dirty bitmap (required)"},
           kOffsetFlag,
           kLengthFlag,
           kTotals,
           {"output", "FORMAT", "human (default), json, nbdinfo or csv"},
           kCacheFlag,
           kBatch,
           kProgress},
          &RunChanged};
}

}  // namespace blockmeta::client
