#!/usr/bin/env bash
# Builds the vtw-serve container image from the root Dockerfile without a Docker engine:
# podman with chroot isolation (plain `podman build` fails on this kind of host on cgroups /
# rlimits), on a debian:bookworm base image made with debootstrap when podman has none.
#
# Usage: scripts/build-image.sh [--base-only] [extra podman build args, e.g. --no-cache]
#        (--base-only: install the tools and make the base image, build nothing)
# Env:   VTW_IMAGE        image name (default vtw-serve:latest)
#        VTW_BASE_IMAGE   base image (default docker.io/library/debian:bookworm)
#        VTW_DEBIAN_MIRROR  debootstrap mirror (default http://deb.debian.org/debian)
#        VTW_REBUILD_BASE=1 re-make the base image even if podman has one
# Needs root (or sudo) for apt-get and debootstrap; installs podman, buildah and debootstrap
# with apt-get when missing. See docs/CONTAINER.md.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${VTW_IMAGE:-vtw-serve:latest}
BASE=${VTW_BASE_IMAGE:-docker.io/library/debian:bookworm}
MIRROR=${VTW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUDO=()
if [ "$(id -u)" != 0 ]; then SUDO=(sudo); fi

log() { echo "[build-image] $(date +%T) $*" >&2; }
die() { echo "[build-image] ERROR: $*" >&2; exit 1; }
secs() { echo $(( $(date +%s) - $1 )); }
T0=$(date +%s)
BASE_ONLY=0
if [ "${1:-}" = --base-only ]; then BASE_ONLY=1; shift; fi

# --- tools -------------------------------------------------------------------------------------
missing=()
for tool in podman buildah debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    podman buildah debootstrap uidmap fuse-overlayfs >&2 || die "apt-get install ${missing[*]} failed"
fi
PODMAN=("${SUDO[@]}" podman)

# --- the shipped model must be there (the image copies it) -------------------------------------
[ "$BASE_ONLY" = 1 ] || [ -f models/vtw-shapes/config.json ] ||
  die "models/vtw-shapes/config.json is missing: the image ships the model (train it first: scripts/train-shipped-model.sh)"

# --- base image ----------------------------------------------------------------------------------
if [ "${VTW_REBUILD_BASE:-0}" != 1 ] && "${PODMAN[@]}" image exists "$BASE"; then
  log "base image $BASE: present"
else
  case "$BASE" in *bookworm*) ;; *) die "no base image $BASE in podman's store (only bookworm can be made here)" ;; esac
  log "base image $BASE: making it with debootstrap --variant=minbase bookworm ($MIRROR)"
  t=$(date +%s)
  rootfs=$(mktemp -d /var/tmp/vtw-bookworm.XXXXXX)
  trap '"${SUDO[@]}" rm -rf "$rootfs"' EXIT
  "${SUDO[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >&2 ||
    die "debootstrap failed (network to $MIRROR?)"
  # Like the official image: bookworm, bookworm-updates and bookworm-security, no caches.
  "${SUDO[@]}" rm -f "$rootfs/etc/apt/sources.list"
  "${SUDO[@]}" tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null <<EOF
Types: deb
URIs: ${MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  "${SUDO[@]}" rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  "${SUDO[@]}" tar -C "$rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["bash"]' - "$BASE" >/dev/null ||
    die "podman import failed"
  "${SUDO[@]}" rm -rf "$rootfs"
  trap - EXIT
  log "base image $BASE: made in $(secs "$t") s"
fi

[ "$BASE_ONLY" = 0 ] || exit 0

# --- the image -----------------------------------------------------------------------------------
log "podman build --isolation=chroot -t $IMAGE . (compiles the project: ~10+ min on 2 cores)"
t=$(date +%s)
# --format docker keeps the HEALTHCHECK (the OCI format has none).
"${PODMAN[@]}" build --isolation=chroot --format docker --pull=never \
  --build-arg DEBIAN_IMAGE="$BASE" -t "$IMAGE" -f Dockerfile "$@" . ||
  die "podman build failed (see above)"
BUILD_S=$(secs "$t")
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in ${BUILD_S} s; size $((size / 1000000)) MB ($(numfmt --to=iec "$size" 2>/dev/null || echo "$size B"))"
log "total $(secs "$T0") s. Smoke test: scripts/smoke-test-image.sh"
