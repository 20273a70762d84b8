#!/usr/bin/env bash
# tests/deploy/systemd_unit_test.sh — checks deploy/systemd offline:
#   1. `systemd-analyze verify` accepts blockmeta.service and prints nothing
#      (it exits 0 on unknown keys or bad values, so any output fails);
#   2. `systemd-analyze security --offline` rates it at most MAX_EXPOSURE;
#   3. the hardening and stop-timing settings the docs promise are there;
#   4. the example config parses as blockmeta.v1.ServerConfig and its
#      shutdown grace fits TimeoutStopSec.
# verify needs ExecStart's binary to exist; blockmetad is not built for this
# test, so a copy of the unit points ExecStart at a stand-in executable.
# Usage (Bazel passes it): systemd_unit_test.sh CONFIG_CHECK_BINARY
# A missing systemd-analyze is a failure, never a skip.
set -euo pipefail

MAX_EXPOSURE=2.0
SERVER_DEFAULT_GRACE=20
unit_src="deploy/systemd/blockmeta.service"
config_src="deploy/systemd/config.textproto"
config_check="$1"

fail() { echo "FAIL: $*" >&2; exit 1; }

command -v systemd-analyze >/dev/null ||
  fail "systemd-analyze not installed (scripts/setup installs systemd)"
[ -f "$unit_src" ] || fail "$unit_src missing"

work="${TEST_TMPDIR:?}/systemd"
rm -rf "$work"
mkdir -p "$work"
printf '#!/bin/sh\nexit 0\n' > "$work/blockmetad"
chmod +x "$work/blockmetad"
grep -q '^ExecStart=/usr/local/bin/blockmetad ' "$unit_src" ||
  fail "ExecStart does not start /usr/local/bin/blockmetad"
sed "s|^ExecStart=/usr/local/bin/blockmetad |ExecStart=$work/blockmetad |" \
  "$unit_src" > "$work/blockmeta.service"

# 1. verify: silent success only.
if ! out=$(systemd-analyze verify --man=no "$work/blockmeta.service" 2>&1); then
  fail "systemd-analyze verify failed: $out"
fi
[ -z "$out" ] || fail "systemd-analyze verify complained: $out"
echo "PASS: systemd-analyze verify"

# 2. security exposure (0 = locked down, 10 = unprotected).
sec=$(systemd-analyze security --offline=true --no-pager \
  "$work/blockmeta.service" 2>&1) || fail "systemd-analyze security: $sec"
exposure=$(printf '%s\n' "$sec" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "no exposure level in: $sec"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
  fail "exposure $exposure > $MAX_EXPOSURE"
echo "PASS: exposure level $exposure (<= $MAX_EXPOSURE)"

# 3. Settings the docs rely on.
for want in \
  'DynamicUser=yes' 'NoNewPrivileges=yes' 'ProtectSystem=strict' \
  'ProtectHome=yes' 'PrivateTmp=yes' 'PrivateDevices=yes' \
  'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' \
  'SystemCallFilter=@system-service' 'CapabilityBoundingSet=' \
  'KillMode=mixed' 'KillSignal=SIGTERM' 'RuntimeDirectory=blockmeta' \
  'ExecStart=/usr/local/bin/blockmetad --config=/etc/blockmeta/config.textproto --log_format=json'; do
  grep -qxF "$want" "$unit_src" || fail "$unit_src lacks '$want'"
done
echo "PASS: hardening settings present"

# 4. Example config parses; TimeoutStopSec > its drain grace.
json=$("$config_check" "$config_src") || fail "$config_src does not parse"
grace=$(printf '%s\n' "$json" |
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("shutdown_grace_seconds", 0))')
[ "$grace" -gt 0 ] || grace=$SERVER_DEFAULT_GRACE
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$unit_src")
[ -n "$stop" ] || fail "TimeoutStopSec not set in seconds"
[ "$stop" -gt "$grace" ] || fail "TimeoutStopSec=$stop <= shutdown grace $grace"
grep -q '^grpc_unix_socket: "/run/blockmeta/' "$config_src" ||
  fail "example config's Unix socket is not under RuntimeDirectory /run/blockmeta"
echo "PASS: config parses; TimeoutStopSec=${stop}s > grace ${grace}s"
