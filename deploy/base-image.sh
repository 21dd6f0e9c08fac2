#!/usr/bin/env bash
# The Debian base `make test-deploy` builds the image on (Dockerfile's BASE_IMAGE), made here: Docker Hub is out
# of reach on the machines this runs on, Debian's package mirror is not. A minimal bookworm
# (debootstrap --variant=minbase) imported into Podman's storage as one layer. Made once: an image already
# there is kept (delete it with `podman rmi IMAGE` to make it afresh).
#
#   deploy/base-image.sh [IMAGE]        (default localhost/imagen-base:bookworm; needs root, debootstrap, podman)
set -euo pipefail
image=${1:-localhost/imagen-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/podman/containers.conf}

if podman image exists "$image"; then
  echo "base image $image: already made"
  exit 0
fi
root=$(mktemp -d /var/tmp/imagen-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
started=$(date +%s)
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log"; exit 1; }
rm -f "$root.log"
# The security and point-release updates as well, as Debian's own images have them.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image: made in $(( $(date +%s) - started )) s ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
