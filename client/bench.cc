// client/bench.cc — see bench.h.
#include "client/bench.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "blockmeta/v1/blockmeta.grpc.pb.h"
#include "client/channel.h"
#include "client/extent_format.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace blockmeta::client {
namespace {

namespace v1 = ::blockmeta::v1;
using Clock = std::chrono::steady_clock;

struct ThreadStats {
  std::vector<int64_t> latencies_ns;
  int64_t calls = 0;
  int64_t ok = 0;
  std::map<std::string, int64_t> errors;
  std::map<std::string, int64_t> cache_outcomes;
};

std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

std::string OutcomeName(v1::CacheOutcome o) {
  std::string n(absl::StripPrefix(v1::CacheOutcome_Name(o), "CACHE_OUTCOME_"));
  return n.empty() ? absl::StrCat(static_cast<int>(o)) : n;
}

// One in-flight unary call.
template <typename Resp>
struct Call {
  grpc::ClientContext context;
  Resp response;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<Resp>> reader;
  Clock::time_point start;
};

// Per-thread driver: keeps `inflight` calls going on its own queue until
// `stop`, recording calls that started at or after `measure_from` and
// completed before `stop`.
template <typename Resp, typename StartFn, typename InspectFn>
void Drive(int inflight, Clock::time_point measure_from, Clock::time_point stop,
           absl::Duration deadline, StartFn start_fn, InspectFn inspect,
           ThreadStats* stats) {
  grpc::CompletionQueue cq;
  auto issue = [&]() {
    auto* call = new Call<Resp>;
    call->context.set_deadline(DeadlineFromNow(deadline));
    call->start = Clock::now();
    call->reader = start_fn(&call->context, &cq);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
  };
  for (int i = 0; i < inflight; ++i) issue();
  int outstanding = inflight;
  void* tag;
  bool ok;
  while (outstanding > 0 && cq.Next(&tag, &ok)) {
    auto* call = static_cast<Call<Resp>*>(tag);
    Clock::time_point now = Clock::now();
    if (call->start >= measure_from && now < stop) {
      ++stats->calls;
      stats->latencies_ns.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(now -
                                                               call->start)
              .count());
      if (call->status.ok()) {
        ++stats->ok;
        inspect(call->response, stats);
      } else {
        ++stats->errors[CodeName(call->status.error_code())];
      }
    }
    delete call;
    --outstanding;
    if (now < stop) {
      issue();
      ++outstanding;
    }
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

absl::Duration Percentile(const std::vector<int64_t>& sorted, double p) {
  if (sorted.empty()) return absl::ZeroDuration();
  size_t i = static_cast<size_t>(
      std::llround(p * static_cast<double>(sorted.size() - 1)));
  return absl::Nanoseconds(sorted[std::min(i, sorted.size() - 1)]);
}

double Micros(absl::Duration d) { return absl::ToDoubleMicroseconds(d); }

// The one JSON writer of the bench output: an object's fields in the order
// added, printed `{"key": value, "key": value}`. Values are numbers, quoted
// strings (JsonQuote) or already-built JSON.
class JsonObject {
 public:
  JsonObject& Raw(absl::string_view key, absl::string_view json) {
    absl::StrAppend(&body_, body_.empty() ? "" : ", ", JsonQuote(key), ": ",
                    json);
    return *this;
  }
  JsonObject& String(absl::string_view key, absl::string_view value) {
    return Raw(key, JsonQuote(value));
  }
  JsonObject& Int(absl::string_view key, int64_t value) {
    return Raw(key, absl::StrCat(value));
  }
  // `value` with `decimals` digits after the point.
  JsonObject& Fixed(absl::string_view key, double value, int decimals) {
    return Raw(key, absl::StrFormat("%.*f", decimals, value));
  }
  std::string Build() const { return absl::StrCat("{", body_, "}"); }

 private:
  std::string body_;
};

}  // namespace

absl::StatusOr<BenchResult> RunBench(const BenchOptions& options) {
  if (options.concurrency < 1) {
    return absl::InvalidArgumentError("concurrency must be >= 1");
  }
  if (options.threads < 1 || options.threads > options.concurrency) {
    return absl::InvalidArgumentError(
        "threads must be between 1 and the concurrency");
  }
  if (options.channels < 1 || options.channels > options.threads) {
    return absl::InvalidArgumentError(
        "channels must be between 1 and the number of threads");
  }
  if (options.duration <= absl::ZeroDuration() ||
      options.warmup < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("duration must be > 0 and warmup >= 0");
  }
  const bool extents = options.rpc == BenchRpc::kExtents;
  if (extents && options.export_name.empty()) {
    return absl::InvalidArgumentError("GetExtents load needs an export name");
  }
  if (extents && options.length == 0) {
    return absl::InvalidArgumentError("request length must be > 0");
  }
  if (options.align == 0) {
    return absl::InvalidArgumentError("alignment must be > 0");
  }

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < options.channels; ++i) {
    auto ch = MakeChannel(options.client, i + 1);
    if (!ch.ok()) return ch.status();
    channels.push_back(*std::move(ch));
  }

  // Random offsets: [offset, end - length] in steps of align.
  uint64_t slots = 1;
  if (extents && options.pattern == BenchPattern::kRandom) {
    uint64_t end = options.range > 0 ? options.offset + options.range : 0;
    if (end == 0) {
      auto stub = v1::BlockMeta::NewStub(channels[0]);
      grpc::ClientContext ctx;
      ctx.set_deadline(DeadlineFromNow(options.client.deadline));
      v1::GetExportInfoRequest req;
      req.set_export_name(options.export_name);
      v1::ExportInfo info;
      grpc::Status s = stub->GetExportInfo(&ctx, req, &info);
      if (!s.ok()) return FromGrpcStatus(s);
      end = info.size();
    }
    if (end < options.offset + options.length) {
      return absl::InvalidArgumentError(absl::StrCat(
          "random range [", options.offset, ", ", end,
          ") is shorter than one request of ", options.length, " bytes"));
    }
    slots = (end - options.length - options.offset) / options.align + 1;
  }

  const Clock::time_point begin = Clock::now();
  const Clock::time_point measure_from =
      begin + absl::ToChronoNanoseconds(options.warmup);
  const Clock::time_point stop =
      measure_from + absl::ToChronoNanoseconds(options.duration);

  std::vector<ThreadStats> stats(options.threads);
  std::vector<std::thread> threads;
  for (int t = 0; t < options.threads; ++t) {
    int inflight = options.concurrency / options.threads +
                   (t < options.concurrency % options.threads ? 1 : 0);
    std::shared_ptr<grpc::Channel> channel = channels[t % channels.size()];
    threads.emplace_back([&, t, inflight, channel]() {
      if (extents) {
        auto stub = v1::BlockMeta::NewStub(channel);
        v1::GetExtentsRequest req;
        req.set_export_name(options.export_name);
        req.set_context(options.context);
        req.set_offset(options.offset);
        req.set_length(options.length);
        req.set_max_extents(options.max_extents);
        req.set_cache_mode(options.cache_mode);
        absl::InsecureBitGen gen;
        const bool random = options.pattern == BenchPattern::kRandom;
        Drive<v1::GetExtentsResponse>(
            inflight, measure_from, stop, options.client.deadline,
            [&](grpc::ClientContext* ctx, grpc::CompletionQueue* cq) {
              if (random) {
                req.set_offset(options.offset +
                               absl::Uniform<uint64_t>(gen, 0, slots) *
                                   options.align);
              }
              return stub->PrepareAsyncGetExtents(ctx, req, cq);
            },
            [](const v1::GetExtentsResponse& r, ThreadStats* s) {
              ++s->cache_outcomes[OutcomeName(r.cache_outcome())];
            },
            &stats[t]);
      } else {
        auto stub = grpc::health::v1::Health::NewStub(channel);
        grpc::health::v1::HealthCheckRequest req;
        req.set_service(options.health_service);
        Drive<grpc::health::v1::HealthCheckResponse>(
            inflight, measure_from, stop, options.client.deadline,
            [&](grpc::ClientContext* ctx, grpc::CompletionQueue* cq) {
              return stub->PrepareAsyncCheck(ctx, req, cq);
            },
            [](const grpc::health::v1::HealthCheckResponse& r, ThreadStats* s) {
              if (r.status() !=
                  grpc::health::v1::HealthCheckResponse::SERVING) {
                ++s->errors["NOT_SERVING"];
              }
            },
            &stats[t]);
      }
    });
  }
  for (std::thread& t : threads) t.join();

  BenchResult result;
  result.rpc = extents ? "GetExtents" : "Health.Check";
  result.concurrency = options.concurrency;
  result.measured = options.duration;
  std::vector<int64_t> all;
  for (ThreadStats& s : stats) {
    result.calls += s.calls;
    result.ok += s.ok;
    for (const auto& [k, v] : s.errors) result.errors[k] += v;
    for (const auto& [k, v] : s.cache_outcomes) result.cache_outcomes[k] += v;
    all.insert(all.end(), s.latencies_ns.begin(), s.latencies_ns.end());
  }
  std::sort(all.begin(), all.end());
  result.qps = static_cast<double>(result.calls) /
               absl::ToDoubleSeconds(options.duration);
  if (!all.empty()) {
    long double sum = 0;
    for (int64_t v : all) sum += v;
    result.mean = absl::Nanoseconds(static_cast<int64_t>(sum / all.size()));
    result.max = absl::Nanoseconds(all.back());
  }
  result.p50 = Percentile(all, 0.50);
  result.p90 = Percentile(all, 0.90);
  result.p99 = Percentile(all, 0.99);
  result.p999 = Percentile(all, 0.999);
  return result;
}

std::string FormatBenchResult(const BenchResult& r) {
  std::string out = absl::StrFormat(
      "%s: concurrency %d, %.1f s measured\n"
      "  calls %d (ok %d), %.0f QPS\n"
      "  latency mean %.0f us, p50 %.0f us, p90 %.0f us, p99 %.0f us, "
      "p999 %.0f us, max %.0f us\n",
      r.rpc, r.concurrency, absl::ToDoubleSeconds(r.measured), r.calls, r.ok,
      r.qps, Micros(r.mean), Micros(r.p50), Micros(r.p90), Micros(r.p99),
      Micros(r.p999), Micros(r.max));
  int64_t errors = 0;
  for (const auto& [k, v] : r.errors) errors += v;
  absl::StrAppend(&out, "  errors ", errors);
  if (!r.errors.empty()) {
    absl::StrAppend(&out, ": ",
                    absl::StrJoin(r.errors, ", ", absl::PairFormatter(" ")));
  }
  absl::StrAppend(&out, "\n");
  if (!r.cache_outcomes.empty()) {
    absl::StrAppend(
        &out, "  cache outcomes: ",
        absl::StrJoin(r.cache_outcomes, ", ", absl::PairFormatter(" ")), "\n");
  }
  return out;
}

std::string BenchResultJson(const BenchResult& r) {
  auto counts = [](const std::map<std::string, int64_t>& m) {
    JsonObject o;
    for (const auto& [k, v] : m) o.Int(k, v);
    return o.Build();
  };
  JsonObject latency;
  latency.Fixed("mean", Micros(r.mean), 1)
      .Fixed("p50", Micros(r.p50), 1)
      .Fixed("p90", Micros(r.p90), 1)
      .Fixed("p99", Micros(r.p99), 1)
      .Fixed("p999", Micros(r.p999), 1)
      .Fixed("max", Micros(r.max), 1);
  return JsonObject()
      .String("rpc", r.rpc)
      .Int("concurrency", r.concurrency)
      .Fixed("seconds", absl::ToDoubleSeconds(r.measured), 3)
      .Int("calls", r.calls)
      .Int("ok", r.ok)
      .Fixed("qps", r.qps, 1)
      .Raw("latency_us", latency.Build())
      .Raw("errors", counts(r.errors))
      .Raw("cache_outcomes", counts(r.cache_outcomes))
      .Build();
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

absl::StatusOr<BenchReport> RunBenchPlan(
    const BenchPlan& plan, BlockMetaClient* client,
    const std::function<void(const BenchResult&)>& on_run, std::ostream* log,
    std::string* failed_step) {
  const BenchOptions& o = plan.load;
  const bool health_only = plan.mode == BenchMode::kHealth;
  auto fail = [&](absl::string_view step, absl::Status s) {
    *failed_step = std::string(step);
    return s;
  };
  // One call first, so an unreachable server or a bad export fails fast
  // with the right status instead of a run of errors.
  if (plan.mode != BenchMode::kExtents) {
    absl::StatusOr<ServingStatus> h = client->Health(o.health_service);
    if (!h.ok()) return fail("health check", h.status());
  }
  if (!health_only && !plan.warm) {
    absl::StatusOr<v1::ExportInfo> info = client->GetExportInfo(o.export_name);
    if (!info.ok()) return fail("GetExportInfo", info.status());
  }
  if (!health_only && plan.warm) {
    v1::MapExtentsRequest req;
    req.set_export_name(o.export_name);
    req.set_context(o.context);
    req.set_offset(o.offset);
    req.set_length(o.pattern == BenchPattern::kRandom ? o.range : o.length);
    req.set_coalesce(true);
    std::unique_ptr<ExtentIterator> it = client->MapExtents(req);
    v1::Extent e;
    int64_t n = 0;
    while (true) {
      absl::StatusOr<bool> more = it->Next(&e);
      if (!more.ok()) {
        return fail("warming the cache (MapExtents)", more.status());
      }
      if (!*more) break;
      ++n;
    }
    *log << "warmed the cache: " << n << " extents\n";
  }

  BenchReport report;
  report.mode = plan.mode;
  auto run = [&](BenchRpc kind) -> absl::StatusOr<const BenchResult*> {
    BenchOptions ko = o;
    ko.rpc = kind;
    absl::StatusOr<BenchResult> r = RunBench(ko);
    if (!r.ok()) return fail("bench", r.status());
    report.all_ok = report.all_ok && r->ok == r->calls;
    report.runs.push_back(*std::move(r));
    on_run(report.runs.back());
    return &report.runs.back();
  };
  if (plan.mode != BenchMode::kCompare) {
    absl::StatusOr<const BenchResult*> r =
        run(health_only ? BenchRpc::kHealth : BenchRpc::kExtents);
    if (!r.ok()) return r.status();
    return report;
  }
  double health_qps = 0, extents_qps = 0;
  for (int i = 0; i < plan.rounds; ++i) {
    absl::StatusOr<const BenchResult*> h = run(BenchRpc::kHealth);
    if (!h.ok()) return h.status();
    double h_qps = (*h)->qps;
    absl::StatusOr<const BenchResult*> x = run(BenchRpc::kExtents);
    if (!x.ok()) return x.status();
    health_qps += h_qps;
    extents_qps += (*x)->qps;
    if (h_qps > 0) report.round_ratios.push_back((*x)->qps / h_qps);
  }
  report.rounds = plan.rounds;
  report.baseline_qps = health_qps / plan.rounds;
  report.extents_qps = extents_qps / plan.rounds;
  report.ratio = health_qps > 0 ? extents_qps / health_qps : 0;
  report.median_round_ratio = Median(report.round_ratios);
  return report;
}

std::string FormatBenchSummary(const BenchReport& r) {
  if (r.mode != BenchMode::kCompare) return "";
  return absl::StrFormat(
      "compare: %d round%s; mean QPS health %.0f, GetExtents %.0f; "
      "GetExtents/health = %.3f (%.1f%%), median round %.3f; per round: %s\n",
      r.rounds, r.rounds == 1 ? "" : "s", r.baseline_qps, r.extents_qps,
      r.ratio, r.ratio * 100, r.median_round_ratio,
      absl::StrJoin(r.round_ratios, " ", [](std::string* o, double v) {
        absl::StrAppend(o, absl::StrFormat("%.3f", v));
      }));
}

std::string BenchReportJson(const BenchReport& r) {
  std::vector<std::string> runs;
  for (const BenchResult& run : r.runs) runs.push_back(BenchResultJson(run));
  if (r.mode != BenchMode::kCompare) {
    return absl::StrCat(runs.empty() ? "{}" : runs[0], "\n");
  }
  return absl::StrCat(
      JsonObject()
          .Raw("runs", absl::StrCat("[", absl::StrJoin(runs, ",\n"), "]"))
          .Fixed("baseline_qps", r.baseline_qps, 1)
          .Fixed("extents_qps", r.extents_qps, 1)
          .Fixed("ratio", r.ratio, 4)
          .Fixed("median_round_ratio", r.median_round_ratio, 4)
          .Build(),
      "\n");
}

}  // namespace blockmeta::client
