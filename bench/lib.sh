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
#
# Scripts that compare against an older revision build it with
# baseline_worktree REPO REV (a detached worktree of REV inside $W, with
# REPO's user.bazelrc, so the shared disk cache serves it) and opt_bazel_bin
# DIR TARGET... (a -c opt build; prints its bazel-bin, exits the script if
# the build fails); baseline_remove drops the worktree and its output base,
# and the EXIT trap does so too if the script ends first.
#
# Scripts that run the release blockmetad and CLI call need_release_bins
# (sets SERVER and CLI from $BM_BIN_DIR, else the --config=opt bazel-bin)
# and need_tools TOOL... (exits 2 naming the first tool missing).

bench_init() {  # NAME
  W="$(mktemp -d "/tmp/$1.XXXXXX")"
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  baseline_remove
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

median() {  # stdin: one number a line -> the median (mean of the middle two)
  sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}

BASELINE_WT=""
BASELINE_REPO=""
baseline_worktree() {  # REPO REV: sets BASELINE_WT (not in a subshell)
  BASELINE_REPO="$1"
  BASELINE_WT="$W/baseline-tree"
  git -C "$1" worktree add --detach "$BASELINE_WT" "$2" >&2
  if [ -f "$1/user.bazelrc" ]; then cp "$1/user.bazelrc" "$BASELINE_WT/"; fi
}

baseline_remove() {  # the worktree, its Bazel server and output base
  [ -n "$BASELINE_WT" ] || return 0
  if [ -d "$BASELINE_WT" ]; then
    (cd "$BASELINE_WT" && bazel clean --expunge 2>/dev/null) || true
  fi
  git -C "$BASELINE_REPO" worktree remove --force "$BASELINE_WT" 2>/dev/null || true
  BASELINE_WT=""
}

opt_bazel_bin() {  # DIR TARGET...: builds -c opt in DIR, prints its bazel-bin
  local dir=$1 bin
  shift
  (cd "$dir" && bazel build --jobs=2 -c opt "$@" >&2) ||
    { echo "BUILD FAILED in $dir" >&2; exit 1; }
  bin="$(cd "$dir" && bazel info -c opt bazel-bin 2>/dev/null)"
  [ -n "$bin" ] || { echo "bazel info failed in $dir" >&2; exit 1; }
  echo "$bin"
}

need_release_bins() {  # sets BIN, SERVER, CLI; exits 2 if one is not built
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  BIN="${BM_BIN_DIR:-$(cd "$root" && bazel info --config=opt bazel-bin 2>/dev/null)}"
  SERVER="$BIN/server/blockmetad"
  CLI="$BIN/client/blockmeta"
  local b
  for b in "$SERVER" "$CLI"; do
    [ -x "$b" ] || { echo "$b missing: bazel build --config=opt //server:blockmetad //client:blockmeta" >&2; exit 2; }
  done
}

need_tools() {  # TOOL...: exits 2 naming the first one not on PATH
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "$t missing" >&2; exit 2; }
  done
}
