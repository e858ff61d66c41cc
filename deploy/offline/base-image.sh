#!/usr/bin/env bash
# Base images made from Debian's packages alone, for hosts that reach no image registry:
#   deploy/offline/base-image.sh          -> ollama-gateway-base:bookworm-<hash>
#       Debian bookworm (minbase) + python3, python3-venv, ca-certificates: the gateway's base,
#       `docker build --build-arg BASE_IMAGE=<that tag> -f deploy/Dockerfile .`
#   deploy/offline/base-image.sh tools    -> ollama-gateway-tools:bookworm-<hash>
#       the same + redis-server and prometheus from Debian: what the deploy test's Redis and
#       Prometheus images are built from (deploy/offline/redis.Dockerfile, prometheus.Dockerfile)
# Prints the tag on stdout. The tag carries a hash of the package list, so a changed list makes
# a new image; an image already present is reused (the Docker image store is the cache).
# Needs root, debootstrap and a Debian mirror reachable from the host (MIRROR).
set -euo pipefail
kind="${1:-base}"
BASE_PACKAGES="python3,python3-venv,ca-certificates"
TOOLS_PACKAGES="redis-server redis-tools prometheus"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
base_tag="ollama-gateway-base:bookworm-$(printf '%s' "$BASE_PACKAGES" | sha256sum | cut -c1-12)"
tools_tag="ollama-gateway-tools:bookworm-$(printf '%s|%s' "$BASE_PACKAGES" "$TOOLS_PACKAGES" | sha256sum | cut -c1-12)"
case "$kind" in
  base) tag="$base_tag" ;;
  tools) tag="$tools_tag" ;;
  *) echo "usage: $0 [base|tools]" >&2; exit 64 ;;
esac
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

root=$(mktemp -d /var/tmp/ollama-gateway-rootfs.XXXXXX)
cleanup() { umount "$root/proc" 2>/dev/null || true; rm -rf "$root"; }
trap cleanup EXIT
echo "base-image.sh: debootstrap bookworm ($BASE_PACKAGES) into $root" >&2
debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$MIRROR" >&2
if [ "$kind" = tools ]; then
  echo "base-image.sh: adding $TOOLS_PACKAGES" >&2
  # No daemon starts inside the chroot while the packages are configured.
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $TOOLS_PACKAGES >&2
  umount "$root/proc"
  rm -f "$root/usr/sbin/policy-rc.d"
fi
# Slim: no package lists, docs, man pages or logs in the image.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
       "$root"/usr/share/locale/* "$root"/var/log/* "$root"/tmp/*
tar -C "$root" --numeric-owner -c . \
  | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["/bin/bash"]' - "$tag" >&2
echo "$tag"
