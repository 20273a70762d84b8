#!/bin/bash
# bench/window_map_bench.sh — cold maps of slow and window-limited upstreams
# (read-ahead, detached fetches), side by side in one run. Prints ratios.
#
# 1. Window-limited: nbdkit sparse-random 16G percent=1 runlength=1048576
#    behind --filter=blocksize maxlen=64M (checked here: the filter cuts
#    every extents request, and so every reply, to 64 MiB, as VDDK does) and
#    --filter=delay delay-extents=100ms. Cold `qemu-img map` through the
#    blockmeta NBD shim and cold `blockmeta map` over gRPC, each against a
#    fresh blockmetad, vs the sequential bound: calls x delay. Target: <= 0.2.
# 2. Large disk: sparse-random 1T with delay-extents=20ms. Cold `blockmeta
#    map` vs `nbdinfo --map` directly against the upstream. Target: >= 4x.
# 3. Single-call latency: `blockmeta bench --rpc=compare` (cache-hit
#    GetExtents vs a health Check on the same server) after map 2.
#    Target: >= 0.9.
#
#   bench/window_map_bench.sh
#   SIZE1=4G DELAY1=100ms SIZE2=256G bench/window_map_bench.sh   # quicker
#   MAP_ROUNDS=5 bench/window_map_bench.sh   # run 2 five times: median ratio
#
# MAP_ROUNDS (default 1) repeats run 2 (the direct map, then a cold map
# against a fresh blockmetad) and reports the median of the per-round
# ratios, since one round on a shared machine is noisy.
#
# Needs nbdkit (sparse-random; blocksize, delay, log filters), qemu-img,
# nbdinfo, and --config=opt builds of //server:blockmetad and
# //client:blockmeta ($BM_BIN_DIR overrides where they are). Not a test.
set -euo pipefail
SIZE1="${SIZE1:-16G}"
DELAY1="${DELAY1:-100ms}"
MAXLEN="${MAXLEN:-64M}"
SIZE2="${SIZE2:-1T}"
DELAY2="${DELAY2:-20ms}"
ROUNDS="${ROUNDS:-10}"
MAP_ROUNDS="${MAP_ROUNDS:-1}"
. "$(dirname "$0")/lib.sh"
need_release_bins
need_tools nbdkit qemu-img nbdinfo bc python3
bench_init window-bench
WAIT_TRIES=4000
secs() { echo "$(now) - $1" | bc; }
ms() { case "$1" in *ms) echo "${1%ms}";; *s) echo "$(( ${1%s} * 1000 ))";; *) echo "$(( $1 * 1000 ))";; esac; }
# Extents calls that reached the plugin (the log filter sits below the
# blocksize filter, so these are the window-limited calls).
calls() { grep -c 'Extents id=[0-9]* offset=' "$1" || true; }

# start_upstream NAME SIZE DELAY [blocksize args...]: nbdkit on $W/NAME.sock
start_upstream() {
  local name=$1 size=$2 delay=$3; shift 3
  local filters=()
  [ $# -gt 0 ] && filters+=(--filter=blocksize)
  filters+=(--filter=log --filter=delay)
  rm -f "$W/$name.sock" "$W/$name.log"
  nbdkit -f -U "$W/$name.sock" "${filters[@]}" sparse-random "$size" seed=1 \
    percent="${PERCENT:-1}" runlength="${RUNLENGTH:-1048576}" \
    delay-extents="$delay" logfile="$W/$name.log" "$@" &
  UP_PID=$!; PIDS+=("$UP_PID")
  wait_sock "$W/$name.sock"
}
# start_server NAME UPSTREAM_SOCK: a fresh (cold) blockmetad
start_server() {
  rm -f "$W/$1.grpc" "$W/$1.nbd"
  "$SERVER" --grpc_listen=127.0.0.1:0 --grpc_unix_socket="$W/$1.grpc" \
    --nbd_unix_socket="$W/$1.nbd" --log_level=warning \
    --export=disk="nbd+unix:///?socket=$2" > "$W/$1.out" 2> "$W/$1.err" &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  wait_sock "$W/$1.grpc"; wait_sock "$W/$1.nbd"
}
cli() { "$CLI" --server="unix:$W/$1.grpc" "${@:2}"; }
stat_field() {  # NAME FIELD: the GetStats total of a cache counter
  cli "$1" stats --output=json disk 2>/dev/null | python3 -c '
import json,sys
d=json.load(sys.stdin); f=sys.argv[1]
camel="".join(w.title() if i else w for i,w in enumerate(f.split("_")))
t=d.get("total", {})
print(t.get(f, t.get(camel, 0)))' "$2" 2>/dev/null || echo "?"
}

echo "# window_map_bench: $(nproc) cores, nbdkit $(nbdkit --version | cut -d' ' -f2), $(qemu-img --version | head -1)"

# --- 1. window-limited upstream -------------------------------------------
echo "# 1. sparse-random $SIZE1 percent=1 runlength=1048576, blocksize maxlen=$MAXLEN, delay-extents=$DELAY1"
start_upstream w1 "$SIZE1" "$DELAY1" maxlen="$MAXLEN"
t0=$(now); nbdinfo --map "nbd+unix:///?socket=$W/w1.sock" > "$W/direct1.map"; D1_T=$(secs "$t0")
D1_C=$(calls "$W/w1.log")
# The filter limits each reply: every plugin call asked at most MAXLEN.
python3 - "$W/w1.log" "$MAXLEN" <<'PY'
import re,sys
lim={'k':1<<10,'M':1<<20,'G':1<<30}; m=sys.argv[2]; lim=int(m[:-1])*lim[m[-1]] if m[-1] in lim else int(m)
c=[int(x,16) for x in re.findall(r'Extents id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)', open(sys.argv[1]).read())]
assert c and max(c) <= lim, "blocksize filter did not limit extents requests"
print("# blocksize check: %d plugin calls, largest %d bytes (limit %d)" % (len(c), max(c), lim))
PY
BOUND1=$(echo "$D1_C * $(ms "$DELAY1") / 1000" | bc -l)
: > "$W/w1.log"
start_server s1 "$W/w1.sock"
t0=$(now); qemu-img map --output=json "nbd+unix:///disk?socket=$W/s1.nbd" > "$W/shim1.json"; Q1_T=$(secs "$t0")
Q1_C=$(calls "$W/w1.log")
stop_pid "$SRV_PID"; : > "$W/w1.log"
start_server s1b "$W/w1.sock"
t0=$(now); cli s1b map --output=nbdinfo disk > "$W/grpc1.map"; M1_T=$(secs "$t0")
M1_C=$(calls "$W/w1.log")
stop_pid "$SRV_PID"; stop_pid "$UP_PID"
cmp -s "$W/direct1.map" "$W/grpc1.map" || { echo "MISMATCH: blockmeta map differs from nbdinfo --map" >&2; exit 1; }

# --- 2. large disk --------------------------------------------------------
echo "# 2. sparse-random $SIZE2 (percent=1 runlength=1048576), delay-extents=$DELAY2, $MAP_ROUNDS round(s)"
start_upstream w2 "$SIZE2" "$DELAY2"
: > "$W/ratios2"
for round in $(seq 1 "$MAP_ROUNDS"); do
  [ "$round" -gt 1 ] && stop_pid "$SRV_PID"
  : > "$W/w2.log"
  t0=$(now); nbdinfo --map "nbd+unix:///?socket=$W/w2.sock" > "$W/direct2.map"; D2_T=$(secs "$t0")
  D2_C=$(calls "$W/w2.log"); : > "$W/w2.log"
  start_server "s2r$round" "$W/w2.sock"
  t0=$(now); cli "s2r$round" map --output=nbdinfo disk > "$W/grpc2.map"; M2_T=$(secs "$t0")
  M2_C=$(calls "$W/w2.log")
  cmp -s "$W/direct2.map" "$W/grpc2.map" || { echo "MISMATCH: blockmeta map differs from nbdinfo --map (2)" >&2; exit 1; }
  echo "$D2_T / $M2_T" | bc -l >> "$W/ratios2"
  if [ "$MAP_ROUNDS" -gt 1 ]; then
    printf "# 2. round %d: direct %.3f s, cold map %.3f s, ratio %.2f\n" \
      "$round" "$D2_T" "$M2_T" "$(tail -1 "$W/ratios2")"
  fi
done
RATIO2=$(sort -g "$W/ratios2" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
RA_ISSUED=$(stat_field "s2r$MAP_ROUNDS" read_ahead_issued)
S2="s2r$MAP_ROUNDS"
# The upstream's own time without the delay: nbdkit computes sparse-random
# extents on one thread (its CPU, not the delay, bounds a parallel map), so
# no scheduling of windows makes a cold map faster than this.
W2_PID=$UP_PID
start_upstream w2z "$SIZE2" 0ms
t0=$(now); nbdinfo --map "nbd+unix:///?socket=$W/w2z.sock" > /dev/null; FLOOR2=$(secs "$t0")
stop_pid "$UP_PID"; UP_PID=$W2_PID

# --- 3. cache-hit GetExtents vs health, same server -----------------------
cli "$S2" bench --rpc=compare --export=disk --concurrency=32 --duration=1s \
  --warmup=300ms --rounds="$ROUNDS" --pattern=random --length=64k > "$W/bench.out" 2>&1 || true
QPS_RATIO=$(grep -oE 'GetExtents/health = [0-9.]+' "$W/bench.out" | tail -1 | grep -oE '[0-9.]+$' || echo "?")
stop_pid "$SRV_PID"; stop_pid "$UP_PID"

r() { printf "%.3f" "$(echo "$1 / $2" | bc -l)"; }
printf "%-46s %9s %9s\n" "run" "wall_s" "upstream"
printf "%-46s %9.3f %9d\n" "1 nbdinfo --map direct (sequential)" "$D1_T" "$D1_C"
printf "%-46s %9.3f %9d\n" "1 qemu-img map via shim, cold" "$Q1_T" "$Q1_C"
printf "%-46s %9.3f %9d\n" "1 blockmeta map, cold" "$M1_T" "$M1_C"
printf "%-46s %9.3f %9d\n" "2 nbdinfo --map direct" "$D2_T" "$D2_C"
printf "%-46s %9.3f %9d\n" "2 blockmeta map, cold" "$M2_T" "$M2_C"
printf "%-46s %9.3f\n" "2 nbdinfo --map, upstream without delay" "$FLOOR2"
echo "# sequential bound 1: $D1_C calls x $DELAY1 = ${BOUND1}s"
echo "RATIO shim_qemu_img_map/bound        $(r "$Q1_T" "$BOUND1")   (target <= 0.2)"
echo "RATIO blockmeta_map/bound            $(r "$M1_T" "$BOUND1")   (target <= 0.2)"
printf "RATIO nbdinfo_direct/blockmeta_map   %.3f   (target >= 4; median of %d)\n" "$RATIO2" "$MAP_ROUNDS"
echo "RATIO hit_getextents/health_qps      $QPS_RATIO   (target >= 0.9)"
echo "# read-ahead issued in run 2: $RA_ISSUED"
echo "# run 2 floor: the undelayed upstream alone takes ${FLOOR2}s (ideal ratio = direct / floor)"
sed 's/^/# bench: /' "$W/bench.out" | tail -8
