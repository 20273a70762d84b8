#!/bin/sh
# deploy/container/runtime-packages.sh — prints, one per line, the Debian
# packages that own the shared libraries the given ELF binaries load.
# The Containerfile's builder stage runs it on blockmetad and blockmeta so
# the runtime stage installs exactly those packages (libgrpc++1.51,
# libprotobuf32, libabsl20220623, libnbd0, libprometheus-cpp-*, ...) and no
# compiler, -dev package or Bazel.
# Usage: runtime-packages.sh BINARY...
# Fails when ldd reports a missing library or dpkg owns no file of one.
set -eu

if [ "$#" -eq 0 ]; then
  echo "usage: $0 BINARY..." >&2
  exit 2
fi

all=""
for bin in "$@"; do
  out=$(ldd "$bin") || { echo "runtime-packages: ldd $bin failed" >&2; exit 1; }
  if printf '%s\n' "$out" | grep -q 'not found'; then
    printf '%s: %s\n' "$bin" "$(printf '%s\n' "$out" | grep 'not found')" >&2
    exit 1
  fi
  all="$all
$out"
done
libs=$(printf '%s\n' "$all" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)

pkgs=""
for lib in $libs; do
  # dpkg records a file under the path its package installed it to; with
  # the merged /usr, ldd may report the /lib or the /usr/lib spelling.
  owner=""
  for candidate in "$lib" "/usr$lib" "${lib#/usr}" "$(readlink -f "$lib")"; do
    if owner=$(dpkg-query -S "$candidate" 2>/dev/null); then break; fi
    owner=""
  done
  if [ -z "$owner" ]; then
    echo "runtime-packages: no Debian package owns $lib" >&2
    exit 1
  fi
  # "libgrpc29:amd64: /usr/lib/..." -> "libgrpc29"
  pkgs="$pkgs
$(printf '%s\n' "$owner" | head -n 1 | cut -d: -f1 | cut -d, -f1)"
done
printf '%s\n' "$pkgs" | sed '/^$/d' | sort -u
