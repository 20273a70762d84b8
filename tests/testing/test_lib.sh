# tests/testing/test_lib.sh — test support for the shell tests (sh_test):
# the work directory, the processes to kill when the test ends however it
# ends, and bounded waits on conditions (never a fixed sleep). Source it
# after `set -euo pipefail` and defining fail():
#
#   . "$TEST_SRCDIR/blockmeta/tests/testing/test_lib.sh"
#   test_init blockmetad_test     # $tmp = /tmp/blockmetad_test.XXXXXX
#   nbdkit -U "$tmp/up.sock" -f memory 1M &
#   pids+=($!); wait_sock "$tmp/up.sock"
#
# test_init makes $tmp under /tmp (Unix socket paths are limited to 107
# bytes: Bazel's TEST_TMPDIR is too deep) and the pids array, and installs
# an EXIT trap that SIGKILLs every pid in it and removes $tmp. eventually
# polls every 50 ms for at most WAIT_TRIES x 50 ms (default 200 = 10 s).

test_init() {  # NAME
  tmp=$(mktemp -d "/tmp/$1.XXXXXX")
  pids=()
  trap test_cleanup EXIT
}

test_cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}

eventually() {  # COMMAND...: true once COMMAND succeeds, false at the bound
  for _ in $(seq 1 "${WAIT_TRIES:-200}"); do "$@" && return 0; sleep 0.05; done
  return 1
}

wait_sock() {  # PATH: a Unix socket is there (its server listens), or fail
  eventually test -S "$1" || fail "socket $1 did not appear"
}

wait_file() {  # PATH: a non-empty file (e.g. blockmetad's --port_file), or fail
  eventually test -s "$1" || fail "$1 did not appear"
}
