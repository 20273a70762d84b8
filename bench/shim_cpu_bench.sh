#!/bin/bash
# bench/shim_cpu_bench.sh — server CPU per NBD request of a warm
# `qemu-img map` through the NBD shim: the current blockmetad against a
# baseline blockmetad, both running side by side against one upstream and
# measured interleaved (A B, B A, A B, ...) so drift in machine load hits
# both alike. qemu-img asks one BLOCK_STATUS (REQ_ONE) per extent, so
# server CPU / extents is the per-request cost: parse, hand-off to a
# worker, cache hit, reply write.
#
#   bench/shim_cpu_bench.sh                       # builds both (see below)
#   NEW_BIN=path/blockmetad BASELINE_BIN=path/blockmetad bench/shim_cpu_bench.sh
#   SIZE=4G ROUNDS=15 MAPS=2 ...
#
# NEW_BIN unset: `bazel build -c opt //server:blockmetad` of this tree.
# BASELINE_BIN unset: the same build of BASELINE_REV (default: the commit
# before the shim's one-thread-per-connection rewrite, found with
# `git log -- server/nbd/connection.cc`) in a temporary git worktree.
# CPU is utime+stime of the whole server process (/proc/PID/stat, which
# keeps the time of exited threads), sampled around MAPS maps per round.
# Prints each binary's median µs/request over ROUNDS rounds, the ratio of
# the medians and the median of the per-round ratios; checks every map
# equals the direct one. Not a test.
set -euo pipefail
SIZE="${SIZE:-4G}"
ROUNDS="${ROUNDS:-15}"
MAPS="${MAPS:-2}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
. "$(dirname "$0")/lib.sh"
bench_init shim-cpu
WAIT_TRIES=400
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

if [ -z "${NEW_BIN:-}" ]; then
  NEW_BIN="$(opt_bazel_bin "$REPO" //server:blockmetad)/server/blockmetad"
fi
if [ -z "${BASELINE_BIN:-}" ]; then
  if [ -z "${BASELINE_REV:-}" ]; then
    rewrite=$(git -C "$REPO" log --format=%H --grep='one thread per connection' -- server/nbd/connection.cc | tail -1)
    [ -n "$rewrite" ] || { echo "cannot find the shim thread rewrite; set BASELINE_REV" >&2; exit 1; }
    BASELINE_REV="${rewrite}^"
  fi
  baseline_worktree "$REPO" "$BASELINE_REV"
  BASELINE_BIN="$W/blockmetad.baseline"
  cp "$(opt_bazel_bin "$BASELINE_WT" //server:blockmetad)/server/blockmetad" \
    "$BASELINE_BIN"
  baseline_remove  # the binary is copied out; free the memory now
fi
cp "$NEW_BIN" "$W/blockmetad.new"
NEW_BIN="$W/blockmetad.new"

nbdkit -f -U "$W/up.sock" sparse-random "$SIZE" seed=1 percent=30 runlength=65536 &
PIDS+=($!); wait_sock "$W/up.sock"
qemu-img map --output=json "nbd+unix:///?socket=$W/up.sock" > "$W/direct.json"
EXTENTS=$(grep -c '"start"' "$W/direct.json")
HZ=$(getconf CLK_TCK)

declare -A PID BIN
BIN[baseline]="$BASELINE_BIN"; BIN[new]="$NEW_BIN"
for which in baseline new; do
  "${BIN[$which]}" --grpc_listen=127.0.0.1:0 --log_level=warning \
    --export=disk="nbd+unix:///?socket=$W/up.sock" \
    --nbd_unix_socket="$W/$which.sock" > /dev/null 2>&1 &
  PID[$which]=$!; PIDS+=("${PID[$which]}"); wait_sock "$W/$which.sock"
  qemu-img map --output=json "nbd+unix:///disk?socket=$W/$which.sock" > "$W/$which.json"  # warm
  cmp -s "$W/$which.json" "$W/direct.json" || { echo "MISMATCH ($which)" >&2; exit 1; }
done

sample() {  # sample WHICH -> µs of server CPU per request over MAPS maps
  local which=$1 pid=${PID[$1]} c0 c1
  c0=$(cpu_ticks "$pid")
  for _ in $(seq 1 "$MAPS"); do
    qemu-img map --output=json "nbd+unix:///disk?socket=$W/$which.sock" > "$W/$which.json"
  done
  c1=$(cpu_ticks "$pid")
  cmp -s "$W/$which.json" "$W/direct.json" || { echo "MISMATCH ($which)" >&2; exit 1; }
  echo "($c1 - $c0) * 1000000 / $HZ / ($MAPS * $EXTENTS)" | bc -l
}
: > "$W/baseline.us"; : > "$W/new.us"; : > "$W/ratio"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="baseline new"; else order="new baseline"; fi
  for which in $order; do
    v=$(sample "$which"); echo "$v" >> "$W/$which.us"
    [ "$which" = baseline ] && b=$v || n=$v
  done
  echo "$n / $b" | bc -l >> "$W/ratio"
  [ -n "${VERBOSE:-}" ] && printf "round %2d: baseline %.2f new %.2f us/req\n" "$r" "$b" "$n" >&2
done
MB=$(median < "$W/baseline.us"); MN=$(median < "$W/new.us"); MR=$(median < "$W/ratio")
echo "# shim_cpu_bench: sparse-random $SIZE, $EXTENTS requests per map, $ROUNDS interleaved rounds x $MAPS maps, $(nproc) cores, CLK_TCK $HZ"
echo "# baseline: ${BASELINE_REV:-$BASELINE_BIN}"
printf "%-9s %22s %10s %10s\n" binary "median_server_us/req" min max
for which in baseline new; do
  m=$([ "$which" = baseline ] && echo "$MB" || echo "$MN")
  printf "%-9s %22.2f %10.2f %10.2f\n" "$which" "$m" \
    "$(sort -g "$W/$which.us" | head -1)" "$(sort -g "$W/$which.us" | tail -1)"
done
printf "new/baseline: ratio of medians %.2fx, median of per-round ratios %.2fx (range %.2f-%.2f)\n" \
  "$(echo "$MN / $MB" | bc -l)" "$MR" "$(sort -g "$W/ratio" | head -1)" "$(sort -g "$W/ratio" | tail -1)"
