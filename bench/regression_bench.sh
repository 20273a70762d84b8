#!/bin/bash
# bench/regression_bench.sh — the current tree against a baseline revision
# (default 1b1232a, main before the code-health work and the engine/shim
# rewrites), side by side in one run, so machine load hits both alike:
#
# 1. Extent cache micro-benchmark: //bench:cache_benchmark (Google
#    Benchmark) of both revisions, run alternately (A B, B A, ...) ROUNDS
#    times; per case both revisions have: median real time of each and the
#    median of the per-round ratios new/baseline. BM_MemoryPerExtent also
#    gets a row for its malloc_bytes_per_extent counter.
# 2. gRPC load: cache-hit GetExtents QPS of a blockmetad of each revision,
#    both serving one nbdkit sparse-random upstream, `blockmeta bench
#    --rpc=extents` runs interleaved the same way. Two series: each
#    revision's own CLI against its own server (what a user sees), and this
#    tree's CLI against both servers (the server alone: the client shares
#    the cores with the server, so a client change would show in series 1).
#
#   bench/regression_bench.sh                    # builds both revisions
#   BASELINE_REV=<rev> ROUNDS=9 RPC_ROUNDS=9 RPC_DURATION=2s ...
#   BASELINE_BIN_DIR=DIR NEW_BIN_DIR=DIR ...     # prebuilt bazel-bin dirs
#
# Builds are `bazel build -c opt` (= --config=opt's compilation mode; the
# config also adds -O2, which -c opt already is) of //server:blockmetad,
# //client:blockmeta and //bench:cache_benchmark; the baseline in a
# temporary `git worktree add --detach` inside the work dir, with this
# tree's user.bazelrc copied in so the shared disk cache serves it. Its
# Bazel server is shut down and the worktree removed on exit, as are the
# servers (bench/lib.sh). A failed build stops the script. Not a test.
set -euo pipefail
BASELINE_REV="${BASELINE_REV:-1b1232a}"
ROUNDS="${ROUNDS:-9}"                  # cache_benchmark rounds
MIN_TIME="${MIN_TIME:-0.1}"            # --benchmark_min_time per case, s
BENCH_FILTER="${BENCH_FILTER:-.}"      # --benchmark_filter
RPC_ROUNDS="${RPC_ROUNDS:-9}"
RPC_DURATION="${RPC_DURATION:-2s}"
RPC_CONCURRENCY="${RPC_CONCURRENCY:-32}"
SIZE="${SIZE:-1G}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
. "$(dirname "$0")/lib.sh"
bench_init regression-bench
WAIT_TRIES=400
TARGETS=(//server:blockmetad //client:blockmeta //bench:cache_benchmark)
# Copies the three binaries of a bazel-bin into $W/WHICH/.
take() {  # take BIN_DIR WHICH
  mkdir -p "$W/$2"
  for f in server/blockmetad client/blockmeta bench/cache_benchmark; do
    [ -x "$1/$f" ] || { echo "$1/$f missing" >&2; exit 1; }
    cp "$1/$f" "$W/$2/"
  done
}
echo "# start: $(date -u +%FT%TZ) $(uptime)" >&2
START_UPTIME="$(uptime)"
NEW_BIN_DIR="${NEW_BIN_DIR:-$(opt_bazel_bin "$REPO" "${TARGETS[@]}")}"
take "$NEW_BIN_DIR" new
if [ -z "${BASELINE_BIN_DIR:-}" ]; then
  baseline_worktree "$REPO" "$BASELINE_REV"
  BASELINE_BIN_DIR="$(opt_bazel_bin "$BASELINE_WT" "${TARGETS[@]}")"
  take "$BASELINE_BIN_DIR" baseline
  # The binaries are copied out: the worktree and its Bazel server go now,
  # so they do not hold memory during the measurements.
  baseline_remove
else
  take "$BASELINE_BIN_DIR" baseline
fi
BASE_DESC="$(git -C "$REPO" rev-parse --short "$BASELINE_REV" 2>/dev/null || echo "$BASELINE_REV")"
NEW_DESC="$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- . 2>/dev/null || echo +dirty)"

# --- 1. cache_benchmark -----------------------------------------------------
# One JSON file per run; cases.py turns them into "case value" lines.
cat > "$W/cases.py" <<'EOF'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    if b.get("error_occurred"):
        sys.exit("benchmark error in %s: %s" % (b["name"], b.get("error_message")))
    unit = b.get("time_unit", "ns")
    scale = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}[unit]
    print("%s %.6g" % (b["name"], b["real_time"] * scale))
    if "malloc_bytes_per_extent" in b:
        print("%s/malloc_bytes_per_extent %.6g" % (b["name"], b["malloc_bytes_per_extent"]))
EOF
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="baseline new"; else order="new baseline"; fi
  for which in $order; do
    "$W/$which/cache_benchmark" --benchmark_format=json --benchmark_min_time="$MIN_TIME" \
      --benchmark_filter="$BENCH_FILTER" > "$W/cb.$which.$r.json" 2> "$W/cb.$which.err" ||
      { echo "cache_benchmark ($which) failed:" >&2; cat "$W/cb.$which.err" >&2; exit 1; }
    python3 "$W/cases.py" "$W/cb.$which.$r.json" > "$W/cb.$which.$r.txt"
  done
  [ -n "${VERBOSE:-}" ] && echo "cache round $r done" >&2
done
echo "# regression_bench: baseline $BASE_DESC vs new $NEW_DESC, $(nproc) cores"
echo "# 1. cache_benchmark (-c opt): $ROUNDS interleaved rounds, --benchmark_min_time=$MIN_TIME; ns/op (real time), bytes for */malloc_bytes_per_extent"
printf "%-62s %12s %12s %8s %8s\n" case baseline new ratio round_md
# Cases of both revisions, in the baseline's order.
awk '{print $1}' "$W/cb.baseline.1.txt" | while read -r c; do
  grep -q "^$c " "$W/cb.new.1.txt" || { echo "# (only in baseline: $c)"; continue; }
  : > "$W/b"; : > "$W/n"; : > "$W/q"
  for r in $(seq 1 "$ROUNDS"); do
    b=$(awk -v c="$c" '$1 == c {print $2}' "$W/cb.baseline.$r.txt")
    n=$(awk -v c="$c" '$1 == c {print $2}' "$W/cb.new.$r.txt")
    echo "$b" >> "$W/b"; echo "$n" >> "$W/n"
    awk -v b="$b" -v n="$n" 'BEGIN {if (b > 0) printf "%.6f\n", n / b}' >> "$W/q"
  done
  MB=$(median < "$W/b"); MN=$(median < "$W/n"); MQ=$(median < "$W/q")
  printf "%-62s %12.1f %12.1f %8.3f %8.3f\n" "$c" "$MB" "$MN" \
    "$(awk -v b="$MB" -v n="$MN" 'BEGIN {print (b > 0) ? n / b : 0}')" "$MQ"
done
awk '{print $1}' "$W/cb.new.1.txt" | while read -r c; do
  grep -q "^$c " "$W/cb.baseline.1.txt" || echo "# (only in new: $c)"
done

# --- 2. gRPC cache-hit GetExtents QPS ---------------------------------------
nbdkit -f -U "$W/up.sock" sparse-random "$SIZE" seed=1 percent=30 runlength=65536 &
PIDS+=($!); wait_sock "$W/up.sock"
for which in baseline new; do
  "$W/$which/blockmetad" --grpc_listen=127.0.0.1:0 --grpc_unix_socket="$W/$which.grpc" \
    --log_level=warning --export=disk="nbd+unix:///?socket=$W/up.sock" \
    > "$W/$which.out" 2> "$W/$which.err" &
  PIDS+=($!); wait_sock "$W/$which.grpc"
done
# qps CLI SERVER -> QPS of one cache-hit GetExtents run (1 MiB ranges at
# random 4 KiB-aligned offsets; bench maps the range first, so every call
# after the first run hits the cache).
qps() {
  "$W/$1/blockmeta" --server="unix:$W/$2.grpc" bench --rpc=extents --export=disk \
    --concurrency="$RPC_CONCURRENCY" --duration="$RPC_DURATION" --warmup=300ms \
    --pattern=random --output=json > "$W/qps.json" 2> "$W/qps.err" ||
    { echo "blockmeta bench ($1 CLI -> $2 server) failed:" >&2; cat "$W/qps.err" "$W/qps.json" >&2; exit 1; }
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
if d["ok"] != d["calls"]: sys.exit("%d of %d calls failed" % (d["calls"] - d["ok"], d["calls"]))
print(d["qps"])' "$W/qps.json"
}
for which in baseline new; do qps "$which" "$which" > /dev/null; done  # warm both caches
for series in own same; do : > "$W/$series.b"; : > "$W/$series.n"; : > "$W/$series.q"; done
for r in $(seq 1 "$RPC_ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="baseline new"; else order="new baseline"; fi
  for series in own same; do
    for which in $order; do
      cli=$([ "$series" = own ] && echo "$which" || echo new)
      v=$(qps "$cli" "$which")
      [ "$which" = baseline ] && b=$v || n=$v
    done
    echo "$b" >> "$W/$series.b"; echo "$n" >> "$W/$series.n"
    awk -v b="$b" -v n="$n" 'BEGIN {printf "%.6f\n", n / b}' >> "$W/$series.q"
    [ -n "${VERBOSE:-}" ] && printf "rpc round %d %s: baseline %.0f new %.0f\n" "$r" "$series" "$b" "$n" >&2
  done
done
echo "# 2. cache-hit GetExtents QPS: nbdkit sparse-random $SIZE, bench --rpc=extents --pattern=random --length=1M (default) --concurrency=$RPC_CONCURRENCY --duration=$RPC_DURATION; $RPC_ROUNDS interleaved rounds"
printf "%-34s %10s %10s %8s %8s %14s\n" series baseline new ratio round_md round_range
for series in own same; do
  label=$([ "$series" = own ] && echo "own CLI -> own server" || echo "new CLI -> each server")
  MB=$(median < "$W/$series.b"); MN=$(median < "$W/$series.n"); MQ=$(median < "$W/$series.q")
  printf "%-34s %10.0f %10.0f %8.3f %8.3f %6.3f-%-6.3f\n" "$label" "$MB" "$MN" \
    "$(awk -v b="$MB" -v n="$MN" 'BEGIN {print n / b}')" "$MQ" \
    "$(sort -g "$W/$series.q" | head -1)" "$(sort -g "$W/$series.q" | tail -1)"
done
echo "# load average: start: ${START_UPTIME##*load average: }; end: $(uptime | sed 's/.*load average: //')"
