#!/bin/bash
# bench/exports_bench.sh — 1,000 exports added at run time to one blockmetad
# in front of ONE local nbdkit (memory plugin, each export its own NBD
# export name on it), with `blockmeta export add` over the gRPC Unix socket.
# Prints blockmetad's threads (with a breakdown by thread name) and RSS
# before and after, the AddExport latency p50/p90/max as the server measured
# it (the "ms" of each admin_call audit line: Add returns once the upstream
# is READY), and ListExports latency (p50/max over 50 calls, from the debug
# request log's latency_us), then removes every export and prints threads
# and RSS again. Targets: < 100 threads, < 200 MiB RSS, add p50 < 100 ms,
# ListExports < 10 ms. Not a test.
#
#   bench/exports_bench.sh                 # N=1000
#   N=200 bench/exports_bench.sh
#
# Binaries: $BM_SERVER / $BM_CLIENT, else the --config=opt builds
# (bazel build --config=opt //server:blockmetad //client:blockmeta), else
# the fastbuild ones in bazel-bin.
set -euo pipefail
N="${N:-1000}"
# Upstream connections per export. 1 keeps nbdkit (one thread per client
# connection) within the machine's thread limit at 1,000 exports.
CONNECTIONS="${CONNECTIONS:-1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OPT="$(cd "$ROOT" && bazel info --config=opt bazel-bin 2>/dev/null || true)"
FAST="$(cd "$ROOT" && bazel info bazel-bin 2>/dev/null || true)"
pick() { for c in "$@"; do [ -x "$c" ] && { echo "$c"; return; }; done; }
BM_SERVER="${BM_SERVER:-$(pick "$OPT/server/blockmetad" "$FAST/server/blockmetad")}"
BM_CLIENT="${BM_CLIENT:-$(pick "$OPT/client/blockmeta" "$FAST/client/blockmeta")}"
[ -x "$BM_SERVER" ] && [ -x "$BM_CLIENT" ] || { echo "build //server:blockmetad and //client:blockmeta first" >&2; exit 2; }
command -v nbdkit >/dev/null || { echo "nbdkit missing" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"  # ~6 fds per export in blockmetad, more in nbdkit

. "$(dirname "$0")/lib.sh"
bench_init exports-bench

nbdkit -U "$W/up.sock" -f --threads=16 memory 64M &
PIDS+=($!)
wait_sock "$W/up.sock"
"$BM_SERVER" --grpc_listen=127.0.0.1:0 --grpc_unix_socket="$W/grpc.sock" \
  --log_level=debug --port_file="$W/ports" 2>"$W/server.log" &
SERVER=$!
PIDS+=($SERVER)
wait_file "$W/ports"
bm() { "$BM_CLIENT" --server="unix:$W/grpc.sock" --timeout=30s "$@"; }

threads() { awk '/^Threads:/ {print $2}' "/proc/$SERVER/status"; }
rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$SERVER/status"; }
breakdown() {
  for t in /proc/"$SERVER"/task/*; do cat "$t/comm"; done |
    sed 's/[0-9]*$//' | sort | uniq -c | sort -rn | awk '{printf "%s=%s ", $2, $1}'
  echo
}
pct() {  # P FILE (sorted numbers)
  awk -v p="$1" '{a[NR]=$1} END {if (NR==0) {print "n/a"; exit}
    i=int(NR*p/100); if (i<1) i=1; if (i>NR) i=NR; print a[i]}' "$2"
}

echo "exports_bench: N=$N connections=$CONNECTIONS server=$BM_SERVER"
echo "idle:    threads=$(threads) rss_mib=$(rss_mib)"
echo "         $(breakdown)"
start=$(date +%s.%N)
for i in $(seq 1 "$N"); do
  bm export add "e$i" --uri="nbd+unix:///e$i?socket=$W/up.sock" \
    --connections="$CONNECTIONS" >/dev/null
done
end=$(date +%s.%N)
sleep 1
echo "$N exports: threads=$(threads) rss_mib=$(rss_mib)"
echo "         $(breakdown)"
grep '"method":"AddExport"' "$W/server.log" | sed -n 's/.*"ms":\([0-9]*\).*/\1/p' | sort -n >"$W/add_ms"
echo "AddExport ms (server side): p50=$(pct 50 "$W/add_ms") p90=$(pct 90 "$W/add_ms") max=$(tail -1 "$W/add_ms") count=$(wc -l <"$W/add_ms")"
echo "add wall time, CLI process per add: $(echo "$end - $start" | bc) s"
for _ in $(seq 1 50); do bm list >/dev/null; done
grep '"method":"/blockmeta.v1.BlockMeta/ListExports"' "$W/server.log" |
  sed -n 's/.*"latency_us":\([0-9]*\).*/\1/p' | sort -n >"$W/list_us"
echo "ListExports ($N exports) us: p50=$(pct 50 "$W/list_us") max=$(tail -1 "$W/list_us") count=$(wc -l <"$W/list_us")"
bm list >"$W/list.txt"; head -2 "$W/list.txt"
for i in $(seq 1 "$N"); do bm export remove "e$i" >/dev/null; done
sleep 1
echo "removed: threads=$(threads) rss_mib=$(rss_mib)"
echo "         $(breakdown)"
