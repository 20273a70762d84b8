#!/bin/bash
# bench/totals_bench.sh — GetTotals (`blockmeta du`) against summing a
# streamed map on the client (`blockmeta map --totals`), side by side in
# one run against one blockmetad. Prints times and ratios.
#
# Upstream: nbdkit sparse-random SIZE (default 16G) percent=50
# runlength=RUNLENGTH (default 65536): a fragmented disk, about
# SIZE / RUNLENGTH extents.
# 1. Cold: COLD_ROUNDS (default 3) times, the first `du` of a fresh server
#    vs the first `map --totals` of another fresh server (both ask the
#    upstream for every window), in alternating order; medians.
# 2. Warm: ROUNDS (default 5) alternating `map --totals` and `du` on a
#    warm server; medians and the ratio map/du, and the CLI's start-up
#    alone (a `health` call) for scale. Both commands must report the same
#    data bytes (checked).
#
#   bench/totals_bench.sh
#   SIZE=64G ROUNDS=3 bench/totals_bench.sh
#
# Needs nbdkit (sparse-random), python3, bc, and builds of
# //server:blockmetad and //client:blockmeta (--config=opt; $BM_BIN_DIR
# overrides where they are). Not a test.
set -euo pipefail
SIZE="${SIZE:-16G}"
RUNLENGTH="${RUNLENGTH:-65536}"
ROUNDS="${ROUNDS:-5}"
COLD_ROUNDS="${COLD_ROUNDS:-3}"
. "$(dirname "$0")/lib.sh"
need_release_bins
need_tools nbdkit bc python3
bench_init totals-bench
WAIT_TRIES=4000
secs() { echo "$(now) - $1" | bc; }

nbdkit -f -U "$W/up.sock" sparse-random "$SIZE" seed=1 percent=50 \
  runlength="$RUNLENGTH" &
PIDS+=($!)
wait_sock "$W/up.sock"

start_server() {  # NAME: a fresh (cold) blockmetad
  "$SERVER" --grpc_listen=127.0.0.1:0 --grpc_unix_socket="$W/$1.grpc" \
    --log_level=warning --export=disk="nbd+unix:///?socket=$W/up.sock" \
    > "$W/$1.out" 2> "$W/$1.err" &
  PIDS+=($!)
  wait_sock "$W/$1.grpc"
}
cli() { "$CLI" --server="unix:$W/$1.grpc" --timeout=600s "${@:2}"; }
# Data bytes (HOLE clear) from each command's JSON output.
du_data() {
  python3 -c 'import json,sys; print(json.load(sys.stdin)["contexts"][0]["data"])'
}
map_data() {
  python3 -c '
import json, sys
t = json.load(sys.stdin)["totals"]
print(sum(x["bytes"] for x in t if not x["type"] & 1))'
}

# Cold: each round two fresh servers, the order alternating.
for i in $(seq 1 "$COLD_ROUNDS"); do
  start_server "du$i"; start_server "map$i"
  if [ $((i % 2)) = 1 ]; then
    t=$(now); cli "du$i" du disk --output=json > "$W/du.json"; secs "$t" >> "$W/cold_du.t"
    t=$(now); cli "map$i" map disk --totals --output=json > "$W/map.json"; secs "$t" >> "$W/cold_map.t"
  else
    t=$(now); cli "map$i" map disk --totals --output=json > "$W/map.json"; secs "$t" >> "$W/cold_map.t"
    t=$(now); cli "du$i" du disk --output=json > "$W/du.json"; secs "$t" >> "$W/cold_du.t"
  fi
  d1=$(du_data < "$W/du.json"); d2=$(map_data < "$W/map.json")
  [ "$d1" = "$d2" ] || { echo "data bytes differ: du $d1, map --totals $d2" >&2; exit 1; }
  [ "$i" = "$COLD_ROUNDS" ] || { stop_pid "${PIDS[-1]}"; stop_pid "${PIDS[-2]}"; }
done
extents=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["extents"])' < "$W/du.json")
echo "upstream: sparse-random $SIZE runlength=$RUNLENGTH: $extents extents, $d1 data bytes"
cold_du=$(median < "$W/cold_du.t"); cold_map=$(median < "$W/cold_map.t")
printf 'cold (median of %d): du %.2f s, map --totals %.2f s, ratio map/du %.2f\n' \
  "$COLD_ROUNDS" "$cold_du" "$cold_map" "$(echo "$cold_map / $cold_du" | bc -l)"
# Warm: the last du server, which has the whole map cached.
a="du$COLD_ROUNDS"
# A CLI call that does nothing on the server: the start-up cost in each
# figure below.
for _ in $(seq 1 "$ROUNDS"); do t=$(now); cli "$a" health > /dev/null; secs "$t" >> "$W/health.t"; done

for _ in $(seq 1 "$ROUNDS"); do
  t=$(now); cli "$a" map disk --totals --output=json > "$W/map.json"; secs "$t" >> "$W/map.t"
  t=$(now); cli "$a" du disk --output=json > "$W/du.json"; secs "$t" >> "$W/du.t"
  [ "$(du_data < "$W/du.json")" = "$(map_data < "$W/map.json")" ] || { echo "data bytes differ" >&2; exit 1; }
done
warm_map=$(median < "$W/map.t"); warm_du=$(median < "$W/du.t")
base=$(median < "$W/health.t")
printf 'warm (median of %d): du %.3f s, map --totals %.3f s, ratio map/du %.1f\n' \
  "$ROUNDS" "$warm_du" "$warm_map" "$(echo "$warm_map / $warm_du" | bc -l)"
printf 'CLI start-up alone (median `health`): %.3f s\n' "$base"
