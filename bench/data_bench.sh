#!/bin/bash
# bench/data_bench.sh — data throughput through the blockmeta NBD shim
# against nbdkit's own NBD proxy and the upstream itself, measured side by
# side in one run. `nbdcopy SRC null:` reads the whole export (it skips
# holes it learns of from base:allocation, as a backup would):
#   (a) directly from nbdkit sparse-random SIZE percent=PERCENT,
#   (b) through `nbdkit nbd socket=...` (nbdkit's own proxy),
#   (c) through blockmetad's NBD shim (--nbd_unix_socket).
# Each is run ROUNDS times (default 3); the median is printed with the
# ratios shim/proxy (target >= 0.9) and shim/direct. Not a test.
#
#   bench/data_bench.sh                   # SIZE=2G PERCENT=50 ROUNDS=3
#   SIZE=4G ROUNDS=5 bench/data_bench.sh
#
# Needs: nbdkit (sparse-random plugin, nbd plugin), nbdcopy, bc, and
# blockmetad: $SHIM_BIN, else the --config=opt build of //server:blockmetad
# (bazel build --config=opt //server:blockmetad).
set -euo pipefail
SIZE="${SIZE:-2G}"
PERCENT="${PERCENT:-50}"
ROUNDS="${ROUNDS:-3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHIM_BIN="${SHIM_BIN:-$(cd "$ROOT" && bazel info --config=opt bazel-bin 2>/dev/null)/server/blockmetad}"
[ -x "$SHIM_BIN" ] || { echo "blockmetad $SHIM_BIN missing; run: bazel build --config=opt //server:blockmetad" >&2; exit 2; }
for t in nbdkit nbdcopy bc; do command -v $t >/dev/null || { echo "$t missing" >&2; exit 2; }; done

. "$(dirname "$0")/lib.sh"
bench_init data-bench
copy() {  # URI -> prints seconds of one nbdcopy to null:
  local t0 t1
  t0=$(now)
  nbdcopy "$1" null:
  t1=$(now)
  echo "$t1 - $t0" | bc
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

rm -f "$W/up.sock"
nbdkit -f -U "$W/up.sock" sparse-random "$SIZE" seed=1 percent="$PERCENT" &
PIDS+=($!); wait_sock "$W/up.sock"
rm -f "$W/proxy.sock"
nbdkit -f -U "$W/proxy.sock" nbd socket="$W/up.sock" &
PIDS+=($!); wait_sock "$W/proxy.sock"
rm -f "$W/shim.sock"
"$SHIM_BIN" --grpc_listen=127.0.0.1:0 --log_level=warning \
  --export=disk="nbd+unix:///?socket=$W/up.sock" \
  --nbd_unix_socket="$W/shim.sock" > "$W/shim.out" 2> "$W/shim.err" &
PIDS+=($!); wait_sock "$W/shim.sock"

BYTES=$(nbdinfo --size "nbd+unix:///?socket=$W/up.sock" 2>/dev/null || echo 0)
echo "# data_bench: nbdcopy to null:, sparse-random $SIZE percent=$PERCENT, median of $ROUNDS"
echo "# $(nproc) cores, nbdkit $(nbdkit --version | cut -d' ' -f2), $(nbdcopy --version | head -1)"
# Interleave the rounds so that load changes hit all three alike.
: > "$W/a"; : > "$W/b"; : > "$W/c"
for _ in $(seq 1 "$ROUNDS"); do
  copy "nbd+unix:///?socket=$W/up.sock" >> "$W/a"
  copy "nbd+unix:///?socket=$W/proxy.sock" >> "$W/b"
  copy "nbd+unix:///disk?socket=$W/shim.sock" >> "$W/c"
done
A=$(median < "$W/a"); B=$(median < "$W/b"); C=$(median < "$W/c")
mibs() { echo "$BYTES / 1048576 / $1" | bc -l; }
printf "%-28s %10s %12s\n" "path" "wall_s" "MiB/s(size)"
printf "%-28s %10.3f %12.0f\n" "(a) direct nbdkit" "$A" "$(mibs "$A")"
printf "%-28s %10.3f %12.0f\n" "(b) nbdkit nbd proxy" "$B" "$(mibs "$B")"
printf "%-28s %10.3f %12.0f\n" "(c) blockmeta shim" "$C" "$(mibs "$C")"
printf "shim/proxy throughput ratio: %.2f (target >= 0.9)\n" "$(echo "$B / $C" | bc -l)"
printf "shim/direct throughput ratio: %.2f\n" "$(echo "$A / $C" | bc -l)"
