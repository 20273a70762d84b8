#!/bin/bash
# bench/shim_map_bench.sh — the motivating measurement of the NBD shim
# A slow-extents upstream (nbdkit sparse-random, made writable by the cow filter, with the delay
# filter's delay-extents; the log filter counts the extents calls that reach
# it) is mapped with `qemu-img map --output=json`:
#   (a) directly,
#   (b) through `nbdkit --filter=cacheextents nbd ...`,
#   (c) through the blockmeta NBD shim (blockmetad --nbd_unix_socket),
# each twice in a row on a fresh upstream (cold, then warm: a second client),
# plus 4 clients at once, plus a map after a 4 KiB write made through the
# proxy (cacheextents wipes its cache on any write; the shim forgets only
# the written range). Prints wall times, upstream extents calls and
# ratios, and checks every map equals the direct one. Not a test.
#
#   bench/shim_map_bench.sh            # SIZE=4G DELAY=10ms RUNLENGTH=4194304
#   SIZE=8G DELAY=20ms bench/shim_map_bench.sh
#
# Needs: nbdkit (sparse-random plugin, delay/log/cacheextents filters),
# qemu-img, and blockmetad: $SHIM_BIN, else the --config=opt build of
# //server:blockmetad (bazel build --config=opt //server:blockmetad).
set -euo pipefail
SIZE="${SIZE:-4G}"
DELAY="${DELAY:-10ms}"
RUNLENGTH="${RUNLENGTH:-4194304}"
PERCENT="${PERCENT:-30}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHIM_BIN="${SHIM_BIN:-$(cd "$ROOT" && bazel info --config=opt bazel-bin 2>/dev/null)/server/blockmetad}"
[ -x "$SHIM_BIN" ] || { echo "blockmetad $SHIM_BIN missing; run: bazel build --config=opt //server:blockmetad" >&2; exit 2; }
for t in nbdkit qemu-img; do command -v $t >/dev/null || { echo "$t missing" >&2; exit 2; }; done

. "$(dirname "$0")/lib.sh"
bench_init shim-bench
elapsed() { echo "$2 - $1" | bc; }

# A fresh slow upstream on $W/slow.sock logging to $W/$1.log.
start_slow() {
  rm -f "$W/slow.sock" "$W/$1.log"
  nbdkit -f -U "$W/slow.sock" --filter=log --filter=delay --filter=cow \
    sparse-random "$SIZE" seed=1 percent="$PERCENT" runlength="$RUNLENGTH" \
    delay-extents="$DELAY" logfile="$W/$1.log" &
  SLOW_PID=$!; PIDS+=("$SLOW_PID")
  wait_sock "$W/slow.sock"
}
calls() { grep -c 'Extents id=[0-9]* offset=' "$W/$1.log" || true; }

map() {  # URI OUT -> prints seconds
  local t0 t1
  t0=$(now)
  qemu-img map --output=json "$1" > "$2"
  t1=$(now)
  elapsed "$t0" "$t1"
}
map4() {  # URI -> 4 concurrent maps, prints seconds for all
  local t0 t1 pids=()
  t0=$(now)
  for i in 1 2 3 4; do qemu-img map --output=json "$1" > "$W/par$i.json" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  t1=$(now)
  for i in 1 2 3 4; do cmp -s "$W/par$i.json" "$W/a.json" || { echo "MISMATCH in parallel map" >&2; exit 1; }; done
  elapsed "$t0" "$t1"
}
# A 4 KiB write through URI, then a map; prints seconds of the map.
write_then_map() {  # URI OUT
  qemu-io -f raw -c "write -P 0x5a 1G 4k" "$1" > /dev/null
  map "$1" "$2"
}
check() { cmp -s "$1" "$W/a.json" || { echo "MISMATCH: $1 differs from the direct map" >&2; exit 1; }; }

echo "# shim_map_bench: sparse-random $SIZE percent=$PERCENT runlength=$RUNLENGTH delay-extents=$DELAY"
echo "# $(nproc) cores, $(qemu-img --version | head -1), nbdkit $(nbdkit --version | cut -d' ' -f2)"

# (a) direct.
start_slow a
A_T=$(map "nbd+unix:///?socket=$W/slow.sock" "$W/a.json")
A_C=$(calls a)
A4_T=$(map4 "nbd+unix:///?socket=$W/slow.sock")
A4_C=$(( $(calls a) - A_C ))
stop_pid "$SLOW_PID"
EXTENTS=$(grep -c '"start"' "$W/a.json")

# (b) nbdkit cacheextents in front of the slow upstream.
start_slow b
rm -f "$W/ce.sock"
nbdkit -f -U "$W/ce.sock" --filter=cacheextents nbd socket="$W/slow.sock" &
CE_PID=$!; PIDS+=("$CE_PID"); wait_sock "$W/ce.sock"
B_T=$(map "nbd+unix:///?socket=$W/ce.sock" "$W/b.json"); check "$W/b.json"
B_C=$(calls b)
B2_T=$(map "nbd+unix:///?socket=$W/ce.sock" "$W/b2.json"); check "$W/b2.json"
B2_C=$(( $(calls b) - B_C ))
B4_T=$(map4 "nbd+unix:///?socket=$W/ce.sock")
B4_C=$(( $(calls b) - B_C - B2_C ))
BW0=$(calls b)
BW_T=$(write_then_map "nbd+unix:///?socket=$W/ce.sock" "$W/bw.json")
BW_C=$(( $(calls b) - BW0 ))
stop_pid "$CE_PID"; stop_pid "$SLOW_PID"

# (c) the blockmeta shim.
start_slow c
rm -f "$W/shim.sock"
"$SHIM_BIN" --grpc_listen=127.0.0.1:0 --log_level=warning \
  --export=disk="nbd+unix:///?socket=$W/slow.sock" \
  --nbd_unix_socket="$W/shim.sock" > "$W/shim.out" 2> "$W/shim.err" &
SHIM_PID=$!; PIDS+=("$SHIM_PID"); wait_sock "$W/shim.sock"
C_T=$(map "nbd+unix:///disk?socket=$W/shim.sock" "$W/c.json"); check "$W/c.json"
C_C=$(calls c)
C2_T=$(map "nbd+unix:///disk?socket=$W/shim.sock" "$W/c2.json"); check "$W/c2.json"
C2_C=$(( $(calls c) - C_C ))
C4_T=$(map4 "nbd+unix:///disk?socket=$W/shim.sock")
C4_C=$(( $(calls c) - C_C - C2_C ))
CW0=$(calls c)
CW_T=$(write_then_map "nbd+unix:///disk?socket=$W/shim.sock" "$W/cw.json")
CW_C=$(( $(calls c) - CW0 ))
cmp -s "$W/bw.json" "$W/cw.json" || { echo "MISMATCH after the write" >&2; exit 1; }
python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); sys.exit(0 if any(e["start"] <= 2**30 < e["start"]+e["length"] and e["data"] for e in m) else 1)' "$W/cw.json" || { echo "the write is not in the shim's map" >&2; exit 1; }
stop_pid "$SHIM_PID"; stop_pid "$SLOW_PID"

ratio() { if [ "$(echo "$2 > 0" | bc)" = 1 ]; then printf "%.1fx" "$(echo "$1 / $2" | bc -l)"; else echo "inf"; fi; }
echo "# extents in the map: $EXTENTS"
printf "%-34s %10s %10s %10s\n" "run" "wall_s" "upstream" "vs_shim"
printf "%-34s %10.3f %10d %10s\n" "(a) direct, cold"            "$A_T"  "$A_C"  "$(ratio "$A_T" "$C_T")"
printf "%-34s %10.3f %10d %10s\n" "(b) cacheextents, cold"      "$B_T"  "$B_C"  "$(ratio "$B_T" "$C_T")"
printf "%-34s %10.3f %10d %10s\n" "(c) blockmeta shim, cold"    "$C_T"  "$C_C"  "1.0x"
printf "%-34s %10.3f %10d %10s\n" "(b) cacheextents, 2nd client" "$B2_T" "$B2_C" "$(ratio "$B2_T" "$C2_T")"
printf "%-34s %10.3f %10d %10s\n" "(c) blockmeta shim, 2nd client" "$C2_T" "$C2_C" "1.0x"
printf "%-34s %10.3f %10d %10s\n" "(a) direct, 4 clients at once" "$A4_T" "$A4_C" "$(ratio "$A4_T" "$C4_T")"
printf "%-34s %10.3f %10d %10s\n" "(b) cacheextents, 4 at once" "$B4_T" "$B4_C" "$(ratio "$B4_T" "$C4_T")"
printf "%-34s %10.3f %10d %10s\n" "(c) blockmeta shim, 4 at once" "$C4_T" "$C4_C" "1.0x"
printf "%-34s %10.3f %10d %10s\n" "(b) cacheextents, after a write" "$BW_T" "$BW_C" "$(ratio "$BW_T" "$CW_T")"
printf "%-34s %10.3f %10d %10s\n" "(c) blockmeta shim, after a write" "$CW_T" "$CW_C" "1.0x"
echo "# every map through (b) and (c) equals the direct map (after the write: (b) equals (c) and shows it)"
