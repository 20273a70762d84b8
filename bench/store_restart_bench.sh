#!/bin/bash
# bench/store_restart_bench.sh — the persistent store (server/store): a map
# after blockmetad restarts, against a warm in-memory map, side by side in
# one run. Prints ratios and upstream call counts (nbdkit's log filter).
#
# Upstream: nbdkit sparse-random $SIZE (percent=1 runlength=1048576) with
# --filter=delay delay-extents=$DELAY, exported as immutable with a
# content_id, blockmetad with store.path set.
#   1. cold map of a fresh blockmetad (empty store): every window upstream;
#   2. per round: SIGKILL blockmetad, start it again on the same store, map
#      (the store answers; only the reopen check reaches the upstream), then
#      map again in the same process (the in-memory cache answers).
# Targets (issue 22): round maps after a restart make 0 upstream
# block-status calls beyond the check (1 per context), and take <= 1.5x
# the warm in-memory map (median of $ROUNDS rounds).
#
#   bench/store_restart_bench.sh
#   SIZE=64G ROUNDS=3 bench/store_restart_bench.sh   # quicker
#
# Needs nbdkit (sparse-random; delay, log filters), nbdinfo, bc, and
# --config=opt builds of //server:blockmetad and //client:blockmeta
# ($BM_BIN_DIR overrides where they are). Not a test.
set -euo pipefail
SIZE="${SIZE:-1T}"
DELAY="${DELAY:-20ms}"
ROUNDS="${ROUNDS:-7}"
. "$(dirname "$0")/lib.sh"
need_release_bins
need_tools nbdkit nbdinfo bc
bench_init store-bench
WAIT_TRIES=4000
secs() { echo "$(now) - $1" | bc; }
calls() { grep -c 'Extents id=[0-9]* offset=' "$W/up.log" || true; }

nbdkit -f -U "$W/up.sock" --filter=log --filter=delay sparse-random "$SIZE" \
  seed=1 percent=1 runlength=1048576 delay-extents="$DELAY" \
  logfile="$W/up.log" &
PIDS+=($!)
wait_sock "$W/up.sock"

cat > "$W/config.textproto" <<EOF
store { path: "$W/store" }
exports {
  name: "disk"
  nbd_uri: "nbd+unix:///?socket=$W/up.sock"
  immutable: true
  content_id: "bench-disk@1"
}
EOF
start_server() {
  rm -f "$W/grpc.sock"
  "$SERVER" --config="$W/config.textproto" --grpc_listen= \
    --grpc_unix_socket="$W/grpc.sock" --log_level=warning \
    > "$W/server.out" 2>> "$W/server.err" &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  wait_sock "$W/grpc.sock"
  for _ in $(seq 1 400); do
    [ "$("$CLI" --server="unix:$W/grpc.sock" health blockmeta.v1.BlockMeta 2>/dev/null)" = SERVING ] && return 0
    sleep 0.05
  done
  echo "blockmetad did not become SERVING" >&2; exit 1
}
map() {  # OUT: time a whole map into OUT; prints seconds
  local t0; t0=$(now)
  "$CLI" --server="unix:$W/grpc.sock" map --output=nbdinfo disk > "$1"
  secs "$t0"
}

echo "# store_restart_bench: $(nproc) cores, nbdkit $(nbdkit --version | cut -d' ' -f2), sparse-random $SIZE percent=1 runlength=1048576, delay-extents=$DELAY"
nbdinfo --map "nbd+unix:///?socket=$W/up.sock" > "$W/direct.map"
: > "$W/up.log"
start_server
COLD_T=$(map "$W/cold.map"); COLD_C=$(calls)
cmp -s "$W/direct.map" "$W/cold.map" || { echo "MISMATCH: cold map differs from nbdinfo --map" >&2; exit 1; }
: > "$W/ratios"; : > "$W/extra"
printf "%-6s %10s %10s %8s %12s\n" round store_s memory_s ratio store_calls
for round in $(seq 1 "$ROUNDS"); do
  kill -9 "$SRV_PID" 2>/dev/null || true; wait "$SRV_PID" 2>/dev/null || true
  : > "$W/up.log"
  start_server
  ST_T=$(map "$W/store.map"); ST_C=$(calls)
  MEM_T=$(map "$W/mem.map"); MEM_C=$(( $(calls) - ST_C ))
  cmp -s "$W/direct.map" "$W/store.map" || { echo "MISMATCH: map after restart differs" >&2; exit 1; }
  cmp -s "$W/direct.map" "$W/mem.map" || { echo "MISMATCH: in-memory map differs" >&2; exit 1; }
  [ "$MEM_C" -eq 0 ] || { echo "in-memory map made $MEM_C upstream calls" >&2; exit 1; }
  R=$(echo "$ST_T / $MEM_T" | bc -l)
  echo "$R" >> "$W/ratios"; echo "$ST_C" >> "$W/extra"
  printf "%-6d %10.3f %10.3f %8.2f %12d\n" "$round" "$ST_T" "$MEM_T" "$R" "$ST_C"
done
du -sb "$W/store" | awk '{print "# store on disk: " $1 " bytes"}'
EXTENTS=$(wc -l < "$W/direct.map")
echo "# cold map: ${COLD_T}s, $COLD_C upstream calls; $EXTENTS extents (nbdinfo --map lines)"
printf "RATIO restart_store_map/memory_map   %.3f   (target <= 1.5; median of %d)\n" \
  "$(median < "$W/ratios")" "$ROUNDS"
echo "CALLS upstream per map after restart: max $(sort -n "$W/extra" | tail -1) (target: 1, the reopen check)"
