// client/bench.h — the load generator behind `blockmeta bench`: keeps
// `concurrency` unary calls in flight against a blockmeta server for a
// duration and measures throughput, latency percentiles and errors.
//
// It drives GetExtents (the cached metadata path) or grpc.health.v1 Check
// (an empty RPC: the baseline cost of a call on the same server) with
// gRPC's async completion-queue API, one polling thread per --threads, so a
// handful of client threads sustain many calls in flight. Latency is
// measured per call, from issue to completion, only for calls issued after
// the warm-up; QPS counts calls completed in the measured window.
//
// RunBenchPlan is the whole `blockmeta bench` session around it: one probe
// call so a bad server or export fails fast, the cache warm-up, then one run
// or --rpc=compare's rounds (baseline and GetExtents alternated) and their
// median. The CLI only parses flags and prints.
//
// Cost: one ClientContext allocation per call plus 8 bytes of latency
// sample; a 10 s run at 50K QPS keeps ~4 MB of samples.
// Thread-safety: RunBench and RunBenchPlan may be called from any thread;
// they block for warmup + duration (per run).
#ifndef BLOCKMETA_CLIENT_BENCH_H_
#define BLOCKMETA_CLIENT_BENCH_H_

#include <cstdint>
#include <functional>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blockmeta/v1/blockmeta.pb.h"
#include "client/blockmeta_client.h"
#include "client/client_options.h"

namespace blockmeta::client {

enum class BenchRpc { kExtents, kHealth };
enum class BenchPattern { kFixed, kRandom };

struct BenchOptions {
  ClientOptions client;
  BenchRpc rpc = BenchRpc::kExtents;
  // GetExtents parameters.
  std::string export_name;
  std::string context;
  BenchPattern pattern = BenchPattern::kFixed;
  // kFixed: every call asks [offset, offset + length). kRandom: offsets are
  // uniform multiples of `align` in [offset, end - length], where end is
  // offset + range (range 0: the export size).
  uint64_t offset = 0;
  uint64_t length = 1 << 20;
  uint64_t range = 0;
  uint64_t align = 4096;
  uint32_t max_extents = 0;
  blockmeta::v1::CacheMode cache_mode = blockmeta::v1::CACHE_MODE_USE;
  // Health parameter.
  std::string health_service;
  // Load shape.
  int concurrency = 16;  // Calls in flight, over all threads.
  int threads = 1;       // Client completion-queue threads.
  int channels = 1;      // Separate HTTP/2 connections.
  absl::Duration warmup = absl::Seconds(1);
  absl::Duration duration = absl::Seconds(10);
};

struct BenchResult {
  std::string rpc;  // "GetExtents" or "Health.Check".
  int concurrency = 0;
  absl::Duration measured;  // The measured window.
  int64_t calls = 0;        // Completed in the window (ok or not).
  int64_t ok = 0;
  double qps = 0;
  absl::Duration mean, p50, p90, p99, p999, max;
  // By status code name ("UNAVAILABLE", ...); only errors.
  std::map<std::string, int64_t> errors;
  // GetExtents only: by CacheOutcome name ("HIT", "MISS", ...).
  std::map<std::string, int64_t> cache_outcomes;
};

// Runs one measurement. INVALID_ARGUMENT for bad options; for kRandom
// without `range`, the export size comes from GetExportInfo (its error is
// returned). Call errors are counted, not returned.
absl::StatusOr<BenchResult> RunBench(const BenchOptions& options);

// Multi-line report for people.
std::string FormatBenchResult(const BenchResult& result);
// One JSON object: {"rpc", "concurrency", "seconds", "calls", "ok", "qps",
// "latency_us": {"mean", "p50", "p90", "p99", "p999", "max"}, "errors": {},
// "cache_outcomes": {}}.
std::string BenchResultJson(const BenchResult& result);

// --- a `blockmeta bench` session --------------------------------------------

// kCompare alternates kHealth (the baseline) and kExtents runs.
enum class BenchMode { kExtents, kHealth, kCompare };

struct BenchPlan {
  BenchOptions load;  // load.rpc is set per run from `mode`.
  BenchMode mode = BenchMode::kExtents;
  int rounds = 3;  // kCompare: baseline/GetExtents pairs (>= 1).
  // Map the measured range once first so GetExtents calls hit the cache
  // (kExtents and kCompare only).
  bool warm = true;
};

struct BenchReport {
  BenchMode mode = BenchMode::kExtents;
  std::vector<BenchResult> runs;  // In the order they ran.
  bool all_ok = true;             // Every measured call succeeded.
  // kCompare only: mean QPS per phase over the rounds, the ratio of the
  // means, each round's ratio and their median (robust to a noisy neighbour
  // slowing one phase).
  int rounds = 0;
  double baseline_qps = 0;
  double extents_qps = 0;
  double ratio = 0;
  std::vector<double> round_ratios;
  double median_round_ratio = 0;
};

// Runs `plan` on `client` (a connection to plan.load.client's server):
//   1. one probe call, so an unreachable server or unknown export fails
//      fast with its status: Health (kHealth, kCompare), GetExportInfo
//      (kExtents/kCompare without warm-up);
//   2. with `warm`, one MapExtents over the range (a line on `log`);
//   3. the runs; `on_run` sees each as soon as it ends.
// On error returns the status and sets *failed_step to what failed
// ("health check", "GetExportInfo", "warming the cache (MapExtents)",
// "bench"). Call errors during runs are counted (all_ok), not returned.
absl::StatusOr<BenchReport> RunBenchPlan(
    const BenchPlan& plan, BlockMetaClient* client,
    const std::function<void(const BenchResult&)>& on_run, std::ostream* log,
    std::string* failed_step);

// The median of `values` (mean of the middle two for an even count; 0 for
// none).
double Median(std::vector<double> values);

// kCompare: the one-line summary (ratio, median, per-round ratios); "" for
// a single run, whose FormatBenchResult says it all.
std::string FormatBenchSummary(const BenchReport& report);
// A single run: BenchResultJson of it. kCompare: {"runs": [...],
// "baseline_qps", "extents_qps", "ratio", "median_round_ratio"}.
// Ends with a newline.
std::string BenchReportJson(const BenchReport& report);

}  // namespace blockmeta::client

#endif  // BLOCKMETA_CLIENT_BENCH_H_
