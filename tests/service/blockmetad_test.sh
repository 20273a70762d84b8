#!/usr/bin/env bash
# tests/service/blockmetad_test.sh — the blockmetad binary as operators run
# it: flags, port file, structured logs, reflection-only clients (what
# grpcurl does), answers equal to nbdinfo --map, bad flags, and a graceful
# SIGTERM shutdown that exits 0 within the grace period.
set -euo pipefail
server_bin="$TEST_SRCDIR/blockmeta/server/blockmetad"
client_py="$TEST_SRCDIR/blockmeta/tests/service/reflection_client.py"
client_bin="$TEST_SRCDIR/blockmeta/client/blockmeta"
fail() { echo "FAIL: $*" >&2; exit 1; }
. "$TEST_SRCDIR/blockmeta/tests/testing/test_lib.sh"
test_init blockmetad_test
for tool in nbdkit nbdinfo curl /usr/bin/python3; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/setup"
done

sock="$tmp/up.sock"
nbdkit -U "$sock" -f data 'data=@1048576 1 2 3 @33554432 (0xaa)*1048576' size=64M &
pids+=($!)
wait_sock "$sock"
uri="nbd+unix:///?socket=$sock"

# 1. Bad flags fail fast with a clear message and a non-zero exit.
if "$server_bin" --export=novalue >"$tmp/bad.out" 2>&1; then fail "--export=novalue accepted"; fi
grep -q "NAME=NBD_URI" "$tmp/bad.out" || fail "unclear error: $(cat "$tmp/bad.out")"
if "$server_bin" --log_format=xml >"$tmp/bad2.out" 2>&1; then fail "--log_format=xml accepted"; fi
if "$server_bin" --config=/nonexistent.textproto >"$tmp/bad3.out" 2>&1; then fail "missing config accepted"; fi
grep -q "nonexistent" "$tmp/bad3.out" || fail "config error does not name the file: $(cat "$tmp/bad3.out")"
# --help lists blockmetad's own flags; --version names the build mode
# (never absl's "Debug build" of the system library in a release binary).
"$server_bin" --help >"$tmp/help.out" 2>&1 || true
grep -q -- "--grpc_listen" "$tmp/help.out" || fail "--help lists no flags: $(cat "$tmp/help.out")"
grep -q "No flags matched" "$tmp/help.out" && fail "--help: No flags matched"
"$server_bin" --version >"$tmp/version.out" 2>&1 || true
grep -q -E "^(release|debug) build" "$tmp/version.out" || fail "--version: $(cat "$tmp/version.out")"
grep -q "Debug build" "$tmp/version.out" && fail "--version: absl's library build line"

# 2. Start it on a free port.
"$server_bin" --grpc_listen=127.0.0.1:0 --export=disk="$uri" \
  --port_file="$tmp/ports" --shutdown_grace_seconds=5 2>"$tmp/server.log" &
server_pid=$!
pids+=($server_pid)
eventually test -s "$tmp/ports" || { cat "$tmp/server.log"; fail "no port file"; }
port=$(sed -n 's/.*grpc=\([0-9]*\).*/\1/p' "$tmp/ports")
grep -q '"event":"serving"' "$tmp/server.log" || fail "no structured 'serving' log line"

# 3. Reflection only (no stubs): list, describe, call.
out=$(/usr/bin/python3 "$client_py" "127.0.0.1:$port" "$tmp" disk) || fail "reflection client failed"
echo "$out" > "$tmp/reflection.json"
expected=$(nbdinfo --map --json "$uri")
/usr/bin/python3 - "$tmp/reflection.json" "$expected" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
truth = json.loads(sys.argv[2])
for s in ("blockmeta.v1.BlockMeta", "csi.v1.SnapshotMetadata",
          "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
    assert s in r["services"], (s, r["services"])
assert r["described"]["blockmeta.v1.BlockMeta"] == sorted(
    ["ListExports", "GetExportInfo", "GetExtents", "MapExtents",
     "InvalidateCache", "GetStats", "GetTotals"]), r["described"]
assert r["described"]["grpc.health.v1.Health"] == ["Check", "Watch"]
assert r["extents"]["code"] == "OK", r["extents"]
got = [(int(e.get("offset", 0)), int(e["length"]), int(e.get("nbd_flags", 0)))
       for e in r["extents"]["body"]["extents"]]
want = []
for e in truth:
    t = (e["offset"], e["length"], e["type"])
    if want and want[-1][0] + want[-1][1] == t[0] and want[-1][2] == t[2]:
        want[-1] = (want[-1][0], want[-1][1] + t[1], t[2])
    else:
        want.append(t)
assert got == want, (got, want)
assert r["bad_extents"]["code"] == "NOT_FOUND", r["bad_extents"]
assert "nope" in r["bad_extents"]["message"]
assert r["health"]["code"] == "OK" and r["health"]["body"]["status"] == "SERVING", r["health"]
print("reflection checks passed")
PY

# 4. SIGTERM: graceful, exit 0, within the grace period.
start=$(date +%s)
kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
elapsed=$(( $(date +%s) - start ))
[ "$rc" -eq 0 ] || { cat "$tmp/server.log"; fail "exit code $rc after SIGTERM"; }
[ "$elapsed" -le 6 ] || fail "shutdown took ${elapsed}s (grace 5s)"
grep -q '"event":"stopped"' "$tmp/server.log" || fail "no 'stopped' log line"
# 5. A call stuck in upstream I/O (libnbd cannot cancel it) does not keep
#    the process alive long past the grace period: exit 1 after grace + 5 s.
slow_sock="$tmp/slow.sock"
nbdkit -U "$slow_sock" -f --filter=delay memory 16M delay-extents=60 &
pids+=($!)
wait_sock "$slow_sock"
rm -f "$tmp/ports"
"$server_bin" --grpc_listen=127.0.0.1:0 --export=slow="nbd+unix:///?socket=$slow_sock" \
  --metrics_listen=127.0.0.1:0 \
  --port_file="$tmp/ports" --shutdown_grace_seconds=1 2>"$tmp/server2.log" &
server_pid=$!
pids+=($server_pid)
wait_file "$tmp/ports"
port=$(sed -n 's/.*grpc=\([0-9]*\).*/\1/p' "$tmp/ports")
metrics_port=$(sed -n 's/.*metrics=\([0-9]*\).*/\1/p' "$tmp/ports")
"$client_bin" --server="127.0.0.1:$port" --timeout=120s map slow --cache=bypass \
  >/dev/null 2>&1 &
pids+=($!)
# Wait until the map's extents call is at the upstream (it stays there 60 s):
# the export has sent its first caller command (health probes not counted).
slow_call_sent() {
  local sent
  sent=$(curl -s "http://127.0.0.1:$metrics_port/metrics" |
    sed -n 's/^blockmeta_upstream_commands_total{export="slow"} \([0-9]*\).*/\1/p') || true
  [ "${sent:-0}" -ge 1 ]
}
WAIT_TRIES=400 eventually slow_call_sent ||
  { cat "$tmp/server2.log"; fail "the map's call never reached the upstream"; }
start=$(date +%s)
kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
elapsed=$(( $(date +%s) - start ))
[ "$rc" -eq 1 ] || { cat "$tmp/server2.log"; fail "expected exit 1 after a forced shutdown, got $rc"; }
[ "$elapsed" -le 10 ] || fail "forced shutdown took ${elapsed}s (grace 1 s + 5 s)"
grep -q '"event":"shutdown_forced"' "$tmp/server2.log" || fail "no shutdown_forced log line"
echo "PASS"
