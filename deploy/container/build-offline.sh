#!/usr/bin/env bash
# deploy/container/build-offline.sh — builds blockmeta's image with podman
# (or buildah) on a machine that reaches the Debian archive but no container
# registry: debootstraps a minimal bookworm root file system, imports it as
# the base image localhost/debian:bookworm, then builds
# deploy/container/Containerfile on top of it. Needs root (debootstrap),
# debootstrap and podman or buildah (`apt-get install podman buildah
# debootstrap`). See docs/deploy.md.
#
# Usage: deploy/container/build-offline.sh [--tag TAG] [--builder podman|buildah]
#          [--mirror URL] [--rootfs DIR] [--base IMAGE] [--rebuild-base]
#          [-- EXTRA BUILD ARGS...]
set -euo pipefail

tag="localhost/blockmeta:dev"
builder="podman"
mirror="http://deb.debian.org/debian"
rootfs="/var/tmp/blockmeta-bookworm-rootfs"
base="localhost/debian:bookworm"
rebuild_base=0
extra=()

while [ "$#" -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --builder) builder="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    --rootfs) rootfs="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-offline: unknown argument $1" >&2; exit 2 ;;
  esac
done

die() { echo "build-offline: $*" >&2; exit 1; }

repo="$(cd "$(dirname "$0")/../.." && pwd)"
[ -f "$repo/WORKSPACE" ] || die "cannot find the repository root from $0"
command -v "$builder" >/dev/null || die "$builder not installed (apt-get install podman buildah)"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root; run with sudo"

# Podman/buildah need a runtime that works here and ulimits that fit the
# default ones; reference setup in docs/deploy.md.
if [ ! -f /etc/containers/containers.conf ]; then
  echo "build-offline: warning: no /etc/containers/containers.conf;" \
    "see docs/deploy.md if the build fails to start containers" >&2
fi

image_exists() {
  if [ "$builder" = buildah ]; then
    buildah inspect --type image "$1" >/dev/null 2>&1
  else
    podman image exists "$1"
  fi
}

# 1. The base image: Debian bookworm from the archive, no registry involved.
if [ "$rebuild_base" -eq 1 ] || ! image_exists "$base"; then
  if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
    echo "build-offline: debootstrap bookworm into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
  fi
  # Package lists and .debs are fetched again by every apt-get update.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  echo "build-offline: importing $rootfs as $base"
  if [ "$builder" = buildah ]; then
    # buildah has no `import`: add the tarball to an empty container.
    tarball="$(mktemp --suffix=.tar)"
    trap 'rm -f "$tarball"' EXIT
    tar -C "$rootfs" --numeric-owner -cf "$tarball" .
    ctr="$(buildah from scratch)"
    buildah add "$ctr" "$tarball" /
    buildah config --cmd '["/bin/bash"]' "$ctr"
    buildah commit --rm "$ctr" "$base"
  else
    tar -C "$rootfs" --numeric-owner -c . |
      podman import --change 'CMD ["/bin/bash"]' - "$base"
  fi
fi

# 2. The image. --network host: the build's apt-get reaches the archive
# through the host; --format docker keeps the HEALTHCHECK.
echo "build-offline: building $tag with $builder"
cd "$repo"
if [ "$builder" = buildah ]; then
  buildah build --format docker --network host --layers \
    --build-arg "DEBIAN_IMAGE=$base" -f deploy/container/Containerfile \
    -t "$tag" "${extra[@]}" .
else
  podman build --format docker --network host \
    --build-arg "DEBIAN_IMAGE=$base" -f deploy/container/Containerfile \
    -t "$tag" "${extra[@]}" .
fi
echo "build-offline: built $tag"
