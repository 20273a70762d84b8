#!/usr/bin/env bash
# tests/deploy/runtime_packages_test.sh — runs deploy/container/
# runtime-packages.sh (the Containerfile's way of choosing the runtime
# image's packages) on a binary linked like blockmetad (config_check links
# the system libprotobuf) and checks the answer names libprotobuf32 and no
# -dev package, and that a missing binary is an error.
# Usage (Bazel passes it): runtime_packages_test.sh CONFIG_CHECK_BINARY
set -euo pipefail

script="deploy/container/runtime-packages.sh"
bin="$1"
fail() { echo "FAIL: $*" >&2; exit 1; }
for tool in ldd dpkg-query; do
  command -v "$tool" >/dev/null || fail "$tool not installed"
done

pkgs=$("$script" "$bin") || fail "$script $bin failed"
echo "$pkgs"
grep -qx 'libprotobuf32' <<<"$pkgs" || fail "libprotobuf32 not listed"
grep -qx 'libc6' <<<"$pkgs" || fail "libc6 not listed"
if grep -q -- '-dev$' <<<"$pkgs"; then fail "a -dev package listed"; fi

if "$script" "${TEST_TMPDIR:?}/no-such-binary" 2>/dev/null; then
  fail "a missing binary did not fail"
fi
echo "PASS"
