# bench/lib.sh — the start-up and clean-up every bench/*.sh shares. Source
# it, then call bench_init once:
#
#   . "$(dirname "$0")/lib.sh"
#   bench_init data-bench          # $W = /tmp/data-bench.XXXXXX
#   nbdkit -f -U "$W/up.sock" ... &
#   PIDS+=($!); wait_sock "$W/up.sock"
#
# bench_init makes the work directory $W and the PIDS array, and installs
# an EXIT trap that kills every PID in PIDS, reaps them and removes $W, so
# a failed or interrupted run leaves no nbdkit / blockmetad behind. Waits
# poll for their condition with a bound (WAIT_TRIES x 50 ms, default 200 =
# 10 s) and exit the script when it does not come. Not a test.

bench_init() {  # NAME
  W="$(mktemp -d "/tmp/$1.XXXXXX")"
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}

wait_sock() {  # PATH: until a Unix socket is there (a server listening)
  for _ in $(seq 1 "${WAIT_TRIES:-200}"); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "socket $1 did not appear" >&2; exit 1
}

wait_file() {  # PATH: until a file is non-empty (e.g. blockmetad's --port_file)
  for _ in $(seq 1 "${WAIT_TRIES:-200}"); do [ -s "$1" ] && return 0; sleep 0.05; done
  echo "file $1 did not appear" >&2; exit 1
}

now() { date +%s.%N; }
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
