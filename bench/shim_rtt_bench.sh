#!/bin/bash
# bench/shim_rtt_bench.sh — one warm synchronous REQ_ONE BLOCK_STATUS round
# trip (what `qemu-img map` sends, one at a time) through the NBD shim
# against `nbdkit file` serving a raw copy of the same disk, side by side
# in one run: the latency per request (bench/nbd_rtt over libnbd) and the
# server CPU per request (utime+stime of each server process from
# /proc/PID/stat, which keeps the time of exited threads), in interleaved
# rounds (shim, nbdkit, nbdkit, shim, ...) so drift in machine load hits
# both alike. Targets (issue 20): latency <= 1.2x, CPU <= 1.0x.
#
#   bench/shim_rtt_bench.sh              # builds --config=opt
#   BIN_DIR=path/to/bazel-bin SIZE=4G RUNS=4000 ROUNDS=9 REQUESTS=30000 bench/...
#   BASELINE_BIN=old/blockmetad bench/shim_rtt_bench.sh  # also an older shim
#
# The disk: a sparse raw file (RUNS runs of 64 KiB data at random
# offsets, holes between); blockmetad fronts `nbdkit file` of it
# (warmed by one full walk), and a second `nbdkit file` of the same file
# is the reference. Prints medians and the ratios. Not a test.
set -euo pipefail
SIZE="${SIZE:-4G}"
ROUNDS="${ROUNDS:-9}"
REQUESTS="${REQUESTS:-30000}"
RUNS="${RUNS:-4000}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
. "$(dirname "$0")/lib.sh"
bench_init shim-rtt
WAIT_TRIES=400
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

if [ -z "${BIN_DIR:-}" ]; then
  BIN_DIR="$(cd "$REPO" && bazel build --jobs=2 --config=opt //server:blockmetad //bench:nbd_rtt >&2 &&
    bazel info --config=opt bazel-bin 2>/dev/null)"
fi
RTT="$BIN_DIR/bench/nbd_rtt"

# A sparse raw file: RUNS runs of 64 KiB of data at seeded random
# 64 KiB-aligned offsets, holes between (a file nbdkit's file plugin maps
# with SEEK_DATA / SEEK_HOLE).
/usr/bin/python3 - "$W/disk.raw" "$SIZE" "$RUNS" <<'PY'
import os, random, sys
path, size, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
size = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
random.seed(1)
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
block = bytes(range(256)) * 256
for _ in range(runs):
    os.pwrite(fd, block, random.randrange(size // 65536) * 65536)
os.close(fd)
PY
echo "# disk: $SIZE raw, $RUNS data runs of 64 KiB, uses $(du -h "$W/disk.raw" | cut -f1)" >&2

nbdkit -f -U "$W/up.sock" file "$W/disk.raw" &  # the shim's upstream
PIDS+=($!); wait_sock "$W/up.sock"
nbdkit -f -U "$W/ref.sock" file "$W/disk.raw" &  # the reference
REF=$!; PIDS+=($REF); wait_sock "$W/ref.sock"
"$BIN_DIR/server/blockmetad" --grpc_listen=127.0.0.1:0 --log_level=warning \
  --export=disk="nbd+unix:///?socket=$W/up.sock" \
  --nbd_unix_socket="$W/shim.sock" > /dev/null 2>&1 &
SHIM=$!; PIDS+=($SHIM); wait_sock "$W/shim.sock"

declare -A PID URI
PID[shim]=$SHIM; URI[shim]="nbd+unix:///disk?socket=$W/shim.sock"
PID[nbdkit]=$REF; URI[nbdkit]="nbd+unix:///?socket=$W/ref.sock"
SERVERS="shim nbdkit"
if [ -n "${BASELINE_BIN:-}" ]; then  # an older blockmetad, same upstream
  "$BASELINE_BIN" --grpc_listen=127.0.0.1:0 --log_level=warning \
    --export=disk="nbd+unix:///?socket=$W/up.sock" \
    --nbd_unix_socket="$W/old.sock" > /dev/null 2>&1 &
  PID[old]=$!; PIDS+=("${PID[old]}"); wait_sock "$W/old.sock"
  URI[old]="nbd+unix:///disk?socket=$W/old.sock"
  SERVERS="shim nbdkit old"
  qemu-img map --output=json "${URI[old]}" > /dev/null  # warm
fi
EXTENTS=$(qemu-img map --output=json "${URI[nbdkit]}" | grep -c '"start"')
# Warm: a walk of the whole disk (read-ahead fills the rest).
qemu-img map --output=json "${URI[shim]}" > "$W/shim.json"
qemu-img map --output=json "${URI[nbdkit]}" > "$W/ref.json"
cmp -s "$W/shim.json" "$W/ref.json" || { echo "MAP MISMATCH" >&2; exit 1; }

sample() {  # WHICH -> "latency_us cpu_us" per request
  local pid=${PID[$1]} c0 c1 out
  c0=$(cpu_ticks "$pid")
  out=$("$RTT" "${URI[$1]}" "$REQUESTS")
  c1=$(cpu_ticks "$pid")
  echo "$(echo "$out" | awk '{print $4}') $(echo "($c1 - $c0) * 1000000 / $HZ / $REQUESTS" | bc -l)"
}
for f in shim.lat nbdkit.lat old.lat shim.cpu nbdkit.cpu old.cpu lat.ratio cpu.ratio; do : > "$W/$f"; done
for r in $(seq 1 "$ROUNDS"); do
  order=$SERVERS
  if [ $((r % 2)) -eq 0 ]; then order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for which in $order; do
    read -r lat cpu < <(sample "$which")
    echo "$lat" >> "$W/$which.lat"; echo "$cpu" >> "$W/$which.cpu"
    case $which in shim) sl=$lat; sc=$cpu ;; nbdkit) nl=$lat; nc=$cpu ;; esac
  done
  echo "$sl / $nl" | bc -l >> "$W/lat.ratio"
  echo "$sc / $nc" | bc -l >> "$W/cpu.ratio"
  [ -n "${VERBOSE:-}" ] && printf "round %d: shim %.1f us %.1f cpu-us, nbdkit %.1f us %.1f cpu-us\n" \
    "$r" "$sl" "$sc" "$nl" "$nc" >&2
done
echo "# shim_rtt_bench: $SIZE raw ($EXTENTS extents), $ROUNDS interleaved rounds x $REQUESTS sync REQ_ONE requests, $(nproc) cores, CLK_TCK $HZ"
printf "%-7s %18s %22s\n" server "median_latency_us" "median_server_cpu_us"
for which in $SERVERS; do
  printf "%-7s %18.2f %22.2f\n" "$which" "$(median < "$W/$which.lat")" "$(median < "$W/$which.cpu")"
done
printf "shim/nbdkit latency: median of per-round ratios %.2fx (range %.2f-%.2f); target <= 1.2x\n" \
  "$(median < "$W/lat.ratio")" "$(sort -g "$W/lat.ratio" | head -1)" "$(sort -g "$W/lat.ratio" | tail -1)"
printf "shim/nbdkit server CPU: median of per-round ratios %.2fx (range %.2f-%.2f); target <= 1.0x\n" \
  "$(median < "$W/cpu.ratio")" "$(sort -g "$W/cpu.ratio" | head -1)" "$(sort -g "$W/cpu.ratio" | tail -1)"
