// client/bench_command.cc — see bench_command.h.
#include "client/bench_command.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "client/bench.h"
#include "common/quote.h"

namespace blockmeta::client {
namespace {

int RunBench(CommandContext& ctx) {
  BenchPlan plan;
  BenchOptions& o = plan.load;
  o.client = ctx.options();
  std::string rpc = ctx.Get("rpc", "extents");
  if (rpc == "extents") {
    plan.mode = BenchMode::kExtents;
  } else if (rpc == "health") {
    plan.mode = BenchMode::kHealth;
  } else if (rpc == "compare") {
    plan.mode = BenchMode::kCompare;
  } else {
    return ctx.Usage(absl::StrCat("--rpc: invalid value ", QuoteBounded(rpc),
                                  " (expected extents, health or compare)"));
  }
  bool json;
  if (auto e = ctx.BasicOutput(&json)) return ctx.Usage(*e);
  o.export_name = ctx.Get("export");
  if (plan.mode != BenchMode::kHealth && o.export_name.empty()) {
    return ctx.Usage(absl::StrCat("--rpc=", rpc, " needs --export=NAME"));
  }
  o.context = ctx.Get("context");
  o.health_service = ctx.Get("service");
  if (auto e = ctx.IntFlag("concurrency", 1, 100000, &o.concurrency)) {
    return ctx.Usage(*e);
  }
  if (auto e = ctx.IntFlag("threads", 1, 256, &o.threads)) {
    return ctx.Usage(*e);
  }
  if (auto e = ctx.IntFlag("channels", 1, 256, &o.channels)) {
    return ctx.Usage(*e);
  }
  if (o.threads > o.concurrency) {
    return ctx.Usage("--threads must not exceed --concurrency");
  }
  if (o.channels > o.threads) {
    return ctx.Usage("--channels must not exceed --threads");
  }
  if (auto e = ctx.DurationFlag("duration", &o.duration)) {
    return ctx.Usage(*e);
  }
  if (auto e = ctx.DurationFlag("warmup", &o.warmup, /*allow_zero=*/true)) {
    return ctx.Usage(*e);
  }
  if (auto e = ctx.IntFlag("rounds", 1, 1000, &plan.rounds)) {
    return ctx.Usage(*e);
  }
  std::string pattern = ctx.Get("pattern", "fixed");
  if (pattern == "fixed") {
    o.pattern = BenchPattern::kFixed;
  } else if (pattern == "random") {
    o.pattern = BenchPattern::kRandom;
  } else {
    return ctx.Usage(absl::StrCat("--pattern: invalid value ",
                                  QuoteBounded(pattern),
                                  " (expected fixed or random)"));
  }
  if (auto e = ctx.SizeFlag("offset", &o.offset)) return ctx.Usage(*e);
  if (auto e = ctx.SizeFlag("length", &o.length)) return ctx.Usage(*e);
  if (auto e = ctx.SizeFlag("range", &o.range)) return ctx.Usage(*e);
  if (auto e = ctx.SizeFlag("align", &o.align)) return ctx.Usage(*e);
  if (o.length == 0) return ctx.Usage("--length must be > 0");
  if (o.align == 0) return ctx.Usage("--align must be > 0");
  int max_extents = 0;
  if (auto e = ctx.IntFlag("max-extents", 0, 65536, &max_extents)) {
    return ctx.Usage(*e);
  }
  o.max_extents = static_cast<uint32_t>(max_extents);
  if (auto e = ctx.CacheFlag(&o.cache_mode)) return ctx.Usage(*e);
  plan.warm = !ctx.Has("no-warm");

  std::string failed_step;
  absl::StatusOr<BenchReport> r = RunBenchPlan(
      plan, &ctx.client(),
      [&](const BenchResult& run) {
        if (json) return;  // One JSON document at the end.
        ctx.out() << FormatBenchResult(run);
        ctx.out().flush();
      },
      &ctx.err(), &failed_step);
  if (!r.ok()) return ctx.Fail(failed_step, r.status());
  ctx.out() << (json ? BenchReportJson(*r) : FormatBenchSummary(*r));
  return r->all_ok ? kExitOk : kExitRpcError;
}

}  // namespace

CommandSpec BenchCommand() {
  return {
      "bench",
      "",
      "load generator: GetExtents or health calls at a concurrency",
      "--rpc=compare alternates an empty-RPC baseline (health Check) with "
      "GetExtents on the same server and prints the QPS ratio. Before "
      "measuring GetExtents it maps the range once so calls hit the cache "
      "(--no-warm skips that).",
      0,
      0,
      {{"rpc", "KIND", "extents (default), health or compare"},
       {"export", "NAME", "export for GetExtents"},
       {"context", "NAME",
        absl::StrCat("metadata context (default ", kDefaultContext, ")")},
       {"concurrency", "N",
        absl::StrCat("calls in flight ",
                     DefaultText(BenchOptions().concurrency))},
       {"threads", "N",
        absl::StrCat("client threads ", DefaultText(BenchOptions().threads))},
       {"channels", "N",
        absl::StrCat("TCP connections ", DefaultText(BenchOptions().channels))},
       {"duration", "DURATION",
        absl::StrCat("measured time per run ",
                     DefaultText(BenchOptions().duration))},
       {"warmup", "DURATION",
        absl::StrCat("unmeasured time before it ",
                     DefaultText(BenchOptions().warmup))},
       {"rounds", "N",
        absl::StrCat("compare: baseline/extents pairs ",
                     DefaultText(BenchPlan().rounds))},
       {"pattern", "KIND", "fixed (default) or random offsets"},
       {"offset", "SIZE", "request offset, or start of the random range"},
       {"length", "SIZE",
        absl::StrCat("request length ",
                     DefaultSizeText(BenchOptions().length))},
       {"range", "SIZE", "random: size of the range (default: to the end)"},
       {"align", "SIZE",
        absl::StrCat("random: offset alignment ",
                     DefaultSizeText(BenchOptions().align))},
       {"max-extents", "N", "GetExtents max_extents (default: server's)"},
       kCacheFlag,
       {"no-warm", "", "do not map the range before measuring"},
       {"service", "NAME", "health: service to check (default \"\")"},
       {"output", "FORMAT", "human (default) or json"}},
      &RunBench};
}

}  // namespace blockmeta::client
