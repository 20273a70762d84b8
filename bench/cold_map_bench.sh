#!/bin/bash
# bench/cold_map_bench.sh — cold maps through the NBD shim vs gRPC vs direct,
# and a window-limited map vs nbdkit's cacheextents, side by side in ONE run.
# Prints ratios (issue 20 item 5).
#
# A. VDDK-like upstream: nbdkit --filter=stats --filter=delay sparse-random
#    $SIZE seed=1 percent=5 runlength=1048576 delay-extents=1000ms (every
#    extents call costs 1 s). Cold `qemu-img map` through the shim, cold
#    `blockmeta map` over gRPC (each against a fresh blockmetad), and
#    `nbdinfo --map` direct. Targets: shim/gRPC <= 1.3, shim/direct <= 0.3.
# B. The same behind --filter=noparallel serialize=requests (one command at
#    a time per connection, as VDDK), served as a read-only export with
#    connections: 8. Same targets.
# C. Window-limited: sparse-random $WSIZE behind --filter=blocksize
#    maxlen=64M and delay-extents=5ms. Cold `qemu-img map` through the shim
#    vs through `nbdkit --filter=cacheextents nbd` (median of $ROUNDS each,
#    alternated). Target: shim/cacheextents < 1.
#
# Upstream calls are counted by the stats filter (one nbdkit per measured
# map, its statsfile written at exit). Every map is checked against the
# direct one (data ranges for qemu-img's JSON, byte-exact for blockmeta).
#
#   bench/cold_map_bench.sh
#   SIZE=16G bench/cold_map_bench.sh            # quicker
#   SCENARIOS="A C" bench/cold_map_bench.sh
#
# Needs nbdkit 1.32 (sparse-random; stats, delay, noparallel, blocksize,
# cacheextents filters; nbd plugin), qemu-img, nbdinfo, python3, bc and
# --config=opt builds of //server:blockmetad and //client:blockmeta
# ($BM_BIN_DIR overrides where they are). Not a test.
set -euo pipefail
SIZE="${SIZE:-64G}"
DELAY="${DELAY:-1000ms}"
WSIZE="${WSIZE:-4G}"
WDELAY="${WDELAY:-5ms}"
MAXLEN="${MAXLEN:-64M}"
ROUNDS="${ROUNDS:-3}"
SCENARIOS="${SCENARIOS:-A B C}"
. "$(dirname "$0")/lib.sh"
need_release_bins
need_tools nbdkit qemu-img nbdinfo bc python3
bench_init cold-map-bench
WAIT_TRIES=4000
secs() { echo "$(now) - $1" | bc; }
r() { printf "%.3f" "$(echo "$1 / $2" | bc -l)"; }

# start_upstream NAME FILTERS... -- PLUGIN ARGS...: nbdkit on $W/NAME.sock
# with the stats filter outermost (statsfile $W/NAME.stats).
start_upstream() {
  local name=$1; shift
  rm -f "$W/$name.sock" "$W/$name.stats"
  nbdkit -f -U "$W/$name.sock" --filter=stats "$@" statsfile="$W/$name.stats" &
  UP_PID=$!; PIDS+=("$UP_PID")
  wait_sock "$W/$name.sock"
}
# Stops the upstream and prints how many extents calls reached it.
stop_upstream_calls() {
  stop_pid "$UP_PID"
  sed -n 's/^extents: \([0-9]*\) ops.*/\1/p' "$1" | head -1 | grep . ||
    { echo "no extents line in $1:" >&2; cat "$1" >&2 || true; echo 0; }
}
# start_server NAME CONFIG_BODY: a fresh (cold) blockmetad with one export
# "disk" (CONFIG_BODY: the ExportConfig fields after the name).
start_server() {
  local name=$1 body=$2
  rm -f "$W/$name.grpc" "$W/$name.nbd"
  printf 'exports { name: "disk" %s }\n' "$body" > "$W/$name.textproto"
  "$SERVER" --config="$W/$name.textproto" --grpc_listen=127.0.0.1:0 \
    --grpc_unix_socket="$W/$name.grpc" --nbd_unix_socket="$W/$name.nbd" \
    --log_level=warning > "$W/$name.out" 2> "$W/$name.err" &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  wait_sock "$W/$name.grpc"; wait_sock "$W/$name.nbd"
  wait_ready "$name"
}
cli() { "$CLI" --server="unix:$W/$1.grpc" "${@:2}"; }
# Waits until the export's upstream is connected (GetExportInfo answers; it
# makes no block-status call, so the cache stays cold).
wait_ready() {
  for _ in $(seq 1 "$WAIT_TRIES"); do
    cli "$1" info disk > /dev/null 2>&1 && return 0; sleep 0.05
  done
  echo "export of $1 not ready" >&2; exit 1
}
stat_field() {  # NAME FIELD: the GetStats total of a cache counter
  cli "$1" stats --output=json disk 2>/dev/null | python3 -c '
import json,sys
d=json.load(sys.stdin); f=sys.argv[1]
camel="".join(w.title() if i else w for i,w in enumerate(f.split("_")))
t=d.get("total", {})
print(t.get(f, t.get(camel, 0)))' "$2" 2>/dev/null || echo "?"
}
# same_data DIRECT_NBDINFO_MAP QEMU_IMG_JSON: the data ranges agree.
same_data() {
  python3 - "$1" "$2" <<'PY'
import json, sys
def merge(rs):
    out = []
    for a, b in rs:
        if out and out[-1][1] == a: out[-1][1] = b
        else: out.append([a, b])
    return out
direct = []
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 3 and int(f[2]) & 1 == 0:  # not a hole: data
        direct.append((int(f[0]), int(f[0]) + int(f[1])))
shim = [(e["start"], e["start"] + e["length"]) for e in json.load(open(sys.argv[2])) if e["data"]]
if merge(direct) != merge(shim):
    sys.exit("MISMATCH: qemu-img map through the shim differs from nbdinfo --map")
PY
}

echo "# cold_map_bench: $(nproc) cores, nbdkit $(nbdkit --version | cut -d' ' -f2), $(qemu-img --version | head -1)"
ROWS=()
row() { ROWS+=("$(printf "%-58s %9.3f %9s" "$1" "$2" "$3")"); }
RATIOS=()

# cold_maps TAG "FILTERS..." "EXPORT_BODY_EXTRA": scenario A or B.
cold_maps() {
  local tag=$1 filters=$2 extra=$3 d_t d_c m_t m_c q_t q_c ra pf
  local plugin=(sparse-random "$SIZE" seed=1 percent=5 runlength=1048576 delay-extents="$DELAY")
  # shellcheck disable=SC2086
  start_upstream "$tag-direct" $filters --filter=delay "${plugin[@]}"
  t0=$(now); nbdinfo --map "nbd+unix:///?socket=$W/$tag-direct.sock" > "$W/$tag-direct.map"; d_t=$(secs "$t0")
  d_c=$(stop_upstream_calls "$W/$tag-direct.stats")
  # shellcheck disable=SC2086
  start_upstream "$tag-grpc" $filters --filter=delay "${plugin[@]}"
  start_server "$tag-g" "nbd_uri: \"nbd+unix:///?socket=$W/$tag-grpc.sock\" $extra"
  t0=$(now); cli "$tag-g" map --output=nbdinfo disk > "$W/$tag-grpc.map"; m_t=$(secs "$t0")
  stop_pid "$SRV_PID"; m_c=$(stop_upstream_calls "$W/$tag-grpc.stats")
  cmp -s "$W/$tag-direct.map" "$W/$tag-grpc.map" || { echo "MISMATCH: blockmeta map differs from nbdinfo --map ($tag)" >&2; exit 1; }
  # shellcheck disable=SC2086
  start_upstream "$tag-shim" $filters --filter=delay "${plugin[@]}"
  start_server "$tag-s" "nbd_uri: \"nbd+unix:///?socket=$W/$tag-shim.sock\" $extra"
  t0=$(now); qemu-img map --output=json "nbd+unix:///disk?socket=$W/$tag-s.nbd" > "$W/$tag-shim.json"; q_t=$(secs "$t0")
  ra=$(stat_field "$tag-s" read_ahead_issued)
  pf=$(stat_field "$tag-s" prefetch_issued)
  stop_pid "$SRV_PID"; q_c=$(stop_upstream_calls "$W/$tag-shim.stats")
  same_data "$W/$tag-direct.map" "$W/$tag-shim.json"
  row "$tag nbdinfo --map direct" "$d_t" "$d_c"
  row "$tag blockmeta map (gRPC), cold" "$m_t" "$m_c"
  row "$tag qemu-img map via shim, cold (read-ahead $ra, prefetch $pf)" "$q_t" "$q_c"
  RATIOS+=("RATIO $tag shim_qemu_img_map/grpc_map      $(r "$q_t" "$m_t")   (target <= 1.3)")
  RATIOS+=("RATIO $tag shim_qemu_img_map/nbdinfo_direct $(r "$q_t" "$d_t")   (target <= 0.3)")
}

for s in $SCENARIOS; do
  case $s in
    A)
      echo "# A. sparse-random $SIZE percent=5 runlength=1048576, delay-extents=$DELAY (default export)"
      cold_maps A "" ""
      ;;
    B)
      echo "# B. A behind --filter=noparallel serialize=requests; read_only export, connections: 8"
      cold_maps B "--filter=noparallel" "connections: 8 read_only: true"
      ;;
    C)
      echo "# C. sparse-random $WSIZE percent=5, blocksize maxlen=$MAXLEN, delay-extents=$WDELAY; $ROUNDS rounds"
      wplugin=(sparse-random "$WSIZE" seed=1 percent=5 runlength=1048576 delay-extents="$WDELAY" maxlen="$MAXLEN")
      start_upstream C-direct --filter=blocksize --filter=delay "${wplugin[@]}"
      nbdinfo --map "nbd+unix:///?socket=$W/C-direct.sock" > "$W/C-direct.map"
      stop_upstream_calls "$W/C-direct.stats" > /dev/null
      : > "$W/C-shim.t"; : > "$W/C-ce.t"
      for round in $(seq 1 "$ROUNDS"); do
        start_upstream "C-s$round" --filter=blocksize --filter=delay "${wplugin[@]}"
        start_server "C-s$round" "nbd_uri: \"nbd+unix:///?socket=$W/C-s$round.sock\""
        t0=$(now); qemu-img map --output=json "nbd+unix:///disk?socket=$W/C-s$round.nbd" > "$W/C-shim.json"; secs "$t0" >> "$W/C-shim.t"
        stop_pid "$SRV_PID"; C_SC=$(stop_upstream_calls "$W/C-s$round.stats")
        same_data "$W/C-direct.map" "$W/C-shim.json"
        start_upstream "C-c$round" --filter=blocksize --filter=delay "${wplugin[@]}"
        rm -f "$W/C-ce$round.sock"
        nbdkit -f -U "$W/C-ce$round.sock" --filter=cacheextents nbd socket="$W/C-c$round.sock" &
        CE_PID=$!; PIDS+=("$CE_PID"); wait_sock "$W/C-ce$round.sock"
        t0=$(now); qemu-img map --output=json "nbd+unix:///?socket=$W/C-ce$round.sock" > "$W/C-ce.json"; secs "$t0" >> "$W/C-ce.t"
        stop_pid "$CE_PID"; C_CC=$(stop_upstream_calls "$W/C-c$round.stats")
        same_data "$W/C-direct.map" "$W/C-ce.json"
      done
      C_S=$(median < "$W/C-shim.t"); C_C=$(median < "$W/C-ce.t")
      row "C qemu-img map via shim, cold (median)" "$C_S" "$C_SC"
      row "C qemu-img map via nbdkit cacheextents, cold (median)" "$C_C" "$C_CC"
      RATIOS+=("RATIO C shim_qemu_img_map/cacheextents  $(r "$C_S" "$C_C")   (target < 1)")
      ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done

printf "%-58s %9s %9s\n" "run" "wall_s" "upstream"
printf "%s\n" "${ROWS[@]}"
printf "%s\n" "${RATIOS[@]}"
