#!/usr/bin/env bash
# tests/service/runtime_exports_cli_test.sh — runtime exports as an operator
# drives them, with the real binaries: `blockmeta export add/remove/list`
# over the gRPC Unix socket, SIGHUP reloads (a good file applied, a bad one
# rejected whole with file:line:column while the server keeps serving), and
# SIGKILL of blockmetad taking its spawned qemu-nbd with it, so a restart
# serves the same writable qcow2 again (its write lock was released) and
# the leaked private directory is cleaned.
set -euo pipefail
server_bin="$TEST_SRCDIR/blockmeta/server/blockmetad"
client_bin="$TEST_SRCDIR/blockmeta/client/blockmeta"
fail() { echo "FAIL: $*" >&2; [ -f "$tmp/server.log" ] && tail -20 "$tmp/server.log" >&2; exit 1; }
. "$TEST_SRCDIR/blockmeta/tests/testing/test_lib.sh"
test_init bm_runtime
for tool in nbdkit qemu-nbd qemu-img; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/setup"
done
export TMPDIR="$tmp"  # spawned servers' private directories go here

sock="$tmp/up.sock"
nbdkit -U "$sock" -f data 'data=@1048576 1' size=8M &
pids+=($!)
wait_sock "$sock"
uri="nbd+unix:///?socket=$sock"
qemu-img create -q -f qcow2 "$tmp/disk.qcow2" 16M

cat >"$tmp/config.textproto" <<CFG
grpc_unix_socket: "$tmp/grpc.sock"
exports { name: "file1" nbd_uri: "$uri" }
exports { name: "vm" image { path: "$tmp/disk.qcow2" } }
CFG
bm() { "$client_bin" --server="unix:$tmp/grpc.sock" --timeout=20s "$@"; }
start() {
  rm -f "$tmp/ports"
  "$server_bin" --config="$tmp/config.textproto" --grpc_listen=127.0.0.1:0 \
    --port_file="$tmp/ports" --log_format=json 2>>"$tmp/server.log" &
  server_pid=$!
  pids+=($server_pid)
  eventually test -s "$tmp/ports" || fail "no port file"
}
export_ready() { bm export list | grep -q "^$1 READY"; }
wait_ready() {  # NAME
  eventually export_ready "$1" || fail "export $1 not READY: $(bm export list)"
}
start
wait_ready file1
wait_ready vm

# 1. CLI add / idempotent add / conflict / remove.
out=$(bm export add job --uri="$uri") || fail "export add: $out"
echo "$out" | grep -q "^added job READY api generation=" || fail "add output: $out"
out=$(bm export add job --uri="$uri") || fail "second add: $out"
echo "$out" | grep -q "^already present job" || fail "idempotent add: $out"
set +e; bm export add job --uri="nbd+unix:///?socket=/elsewhere" >"$tmp/conflict" 2>&1; rc=$?; set -e
[ "$rc" = 1 ] && grep -q "ALREADY_EXISTS" "$tmp/conflict" || fail "conflict: rc=$rc $(cat "$tmp/conflict")"
grep -q '"event":"admin_call".*"method":"AddExport".*"export":"job"' "$tmp/server.log" || fail "no audit line"
bm export list | grep -q "^file1 READY file" || fail "origin file: $(bm export list)"
out=$(bm export remove job) || fail "remove: $out"
set +e; bm info job >"$tmp/gone" 2>&1; rc=$?; set -e
[ "$rc" = 1 ] && grep -q "NOT_FOUND" "$tmp/gone" || fail "removed export still answers: $(cat "$tmp/gone")"
# Admin over TCP without an mTLS identity: PERMISSION_DENIED.
port=$(sed -n 's/.*grpc=\([0-9]*\).*/\1/p' "$tmp/ports")
set +e; "$client_bin" --server="127.0.0.1:$port" export list >"$tmp/denied" 2>&1; rc=$?; set -e
grep -q "PERMISSION_DENIED" "$tmp/denied" || fail "TCP admin not denied: $(cat "$tmp/denied")"

# 2. SIGHUP with a good file: file2 added, file1 kept, API export kept.
bm export add apijob --uri="$uri" >/dev/null
cat >>"$tmp/config.textproto" <<CFG
exports { name: "file2" nbd_uri: "$uri" }
CFG
kill -HUP "$server_pid"
wait_ready file2
bm export list | grep -q "^apijob READY api" || fail "API export lost on reload"
kill -0 "$server_pid" || fail "SIGHUP killed blockmetad"

# 3. SIGHUP with a bad file: rejected whole with file:line:column.
cp "$tmp/config.textproto" "$tmp/good.textproto"
printf 'exports { name: "file3" nbd_uri: "%s" }\nexports { nmae: "typo" }\n' "$uri" >>"$tmp/config.textproto"
kill -HUP "$server_pid"
WAIT_TRIES=100 eventually grep -q config_reload_rejected "$tmp/server.log" || true
grep '"event":"config_reload_rejected"' "$tmp/server.log" | grep -q 'config.textproto:[0-9]*:[0-9]*' \
  || fail "no file:line:column in the rejection"
kill -0 "$server_pid" || fail "bad reload killed blockmetad"
if bm export list | grep -q "^file3"; then fail "half of a bad file was applied"; fi
bm export list | grep -q "^file2 READY" || fail "running set changed by a bad reload"
cp "$tmp/good.textproto" "$tmp/config.textproto"

# 4. SIGKILL: the spawned qemu-nbd dies with blockmetad (parent-death
# signal), so a restart gets the qcow2 write lock and serves it again.
qemu_pid=$(pgrep -P "$server_pid" qemu-nbd || true)
[ -n "$qemu_pid" ] || fail "no spawned qemu-nbd child"
kill -9 "$server_pid"
gone() { ! kill -0 "$1" 2>/dev/null; }
WAIT_TRIES=100 eventually gone "$qemu_pid" || true
if kill -0 "$qemu_pid" 2>/dev/null; then fail "qemu-nbd $qemu_pid outlived a SIGKILLed blockmetad"; fi
ls -d "$tmp"/blockmeta-* >/dev/null 2>&1 || fail "expected the killed server's private dir to be left"
start
grep -q '"event":"stale_spawn_dirs_removed"' "$tmp/server.log" || fail "stale dir not cleaned"
wait_ready vm
bm info vm | grep -q "read-only: *no" || fail "vm not writable after restart: $(bm info vm)"
kill -TERM "$server_pid"
wait "$server_pid" || fail "exit code $? after SIGTERM"
if ls -d "$tmp"/blockmeta-* >/dev/null 2>&1; then fail "private dir left after SIGTERM"; fi
echo PASS
