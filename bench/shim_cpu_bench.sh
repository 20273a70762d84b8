#!/bin/bash
# bench/shim_cpu_bench.sh — server CPU per request of a warm `qemu-img map`
# through the NBD shim, two blockmetad binaries side by side in one run
# (e.g. before and after a change to server/nbd). qemu-img asks one
# BLOCK_STATUS (REQ_ONE) per extent, so CPU / extents is the per-request
# cost: parse, hand-off to a worker, cache hit, reply write.
#
#   NEW_BIN=path/blockmetad OLD_BIN=path/blockmetad bench/shim_cpu_bench.sh
#   SIZE=4G ROUNDS=3 ...
# Prints per-binary server CPU µs per request, wall seconds per map, and
# new/old ratios; checks both maps equal the direct one. Not a test.
set -euo pipefail
SIZE="${SIZE:-4G}"
ROUNDS="${ROUNDS:-3}"
: "${NEW_BIN:?NEW_BIN=blockmetad to measure}" "${OLD_BIN:?OLD_BIN=blockmetad to compare with}"
. "$(dirname "$0")/lib.sh"
bench_init shim-cpu
WAIT_TRIES=400
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

nbdkit -f -U "$W/up.sock" sparse-random "$SIZE" seed=1 percent=30 runlength=65536 &
PIDS+=($!); wait_sock "$W/up.sock"
qemu-img map --output=json "nbd+unix:///?socket=$W/up.sock" > "$W/direct.json"
EXTENTS=$(grep -c '"start"' "$W/direct.json")
HZ=$(getconf CLK_TCK)

declare -A CPU WALL
for which in old new; do
  bin=OLD_BIN; [ "$which" = new ] && bin=NEW_BIN
  "${!bin}" --grpc_listen=127.0.0.1:0 --log_level=warning \
    --export=disk="nbd+unix:///?socket=$W/up.sock" \
    --nbd_unix_socket="$W/$which.sock" > /dev/null 2>&1 &
  pid=$!; PIDS+=("$pid"); wait_sock "$W/$which.sock"
  qemu-img map --output=json "nbd+unix:///disk?socket=$W/$which.sock" > "$W/$which.json"  # warm
  cmp -s "$W/$which.json" "$W/direct.json" || { echo "MISMATCH ($which)" >&2; exit 1; }
  c0=$(cpu_ticks "$pid"); t0=$(now)
  for _ in $(seq 1 "$ROUNDS"); do
    qemu-img map --output=json "nbd+unix:///disk?socket=$W/$which.sock" > "$W/$which.json"
  done
  t1=$(now); c1=$(cpu_ticks "$pid")
  cmp -s "$W/$which.json" "$W/direct.json" || { echo "MISMATCH ($which)" >&2; exit 1; }
  CPU[$which]=$(echo "($c1 - $c0) * 1000000 / $HZ / ($ROUNDS * $EXTENTS)" | bc -l)
  WALL[$which]=$(echo "($t1 - $t0) / $ROUNDS" | bc -l)
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
echo "# shim_cpu_bench: sparse-random $SIZE, $EXTENTS extents (requests) per map, $ROUNDS warm maps each, $(nproc) cores"
printf "%-8s %18s %14s\n" binary "server_us/request" "wall_s/map"
printf "%-8s %18.2f %14.3f\n" old "${CPU[old]}" "${WALL[old]}"
printf "%-8s %18.2f %14.3f\n" new "${CPU[new]}" "${WALL[new]}"
printf "new/old: cpu %.2fx, wall %.2fx\n" "$(echo "${CPU[new]} / ${CPU[old]}" | bc -l)" "$(echo "${WALL[new]} / ${WALL[old]}" | bc -l)"
