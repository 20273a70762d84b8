#!/bin/bash
# tests/fuzz/run_fuzz.sh — builds the NBD shim's libFuzzer target
# (server/nbd/handshake_fuzz.cc) with clang-14
# -fsanitize=fuzzer,address,undefined and runs it for a bounded time on a
# copy of the seed corpus. Usable in CI: exits nonzero on a crash, a leak,
# a sanitizer report or a build failure.
#
#   tests/fuzz/run_fuzz.sh [SECONDS]     (default 30)
#
# Outputs (binary, working corpus, crash artifacts) go to $FUZZ_OUT
# (default: a fresh temp dir, printed). Needs clang-14 and libclang-rt-14-dev.
set -euo pipefail
SECONDS_TO_RUN="${1:-30}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${FUZZ_OUT:-$(mktemp -d /tmp/blockmeta-fuzz.XXXXXX)}"
mkdir -p "$OUT/corpus" "$OUT/artifacts"
CXX="${CXX:-clang++-14}"
command -v "$CXX" >/dev/null || { echo "run_fuzz.sh: $CXX not found" >&2; exit 2; }

ABSL_LIBS="$(pkg-config --libs absl_status absl_statusor absl_strings \
  absl_str_format absl_synchronization absl_time absl_hash absl_raw_hash_set) $(pkg-config --libs libnbd)"
SRCS=(
  server/nbd/stream.cc server/nbd/handshake.cc server/nbd/request.cc
  server/nbd/handler.cc tests/testing/fake_upstream.cc server/upstream/nbd_errors.cc
  server/nbd/handshake_fuzz.cc server/cache/extent_cache.cc
  server/cache/eviction.cc server/cache/read_ahead.cc server/cache/granule.cc
)
cd "$ROOT"
echo "run_fuzz.sh: building $OUT/handshake_fuzz with $CXX"
"$CXX" -std=c++17 -O1 -g -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I. "${SRCS[@]}" -o "$OUT/handshake_fuzz" $ABSL_LIBS -lpthread

cp server/nbd/fuzz_corpus/* "$OUT/corpus/"
echo "run_fuzz.sh: fuzzing for ${SECONDS_TO_RUN}s (corpus $OUT/corpus)"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
"$OUT/handshake_fuzz" -max_total_time="$SECONDS_TO_RUN" -max_len=16384 \
  -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
  -artifact_prefix="$OUT/artifacts/" "$OUT/corpus"
echo "run_fuzz.sh: no crash in ${SECONDS_TO_RUN}s; outputs in $OUT"
