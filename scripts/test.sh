#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds into build/, and runs every test: the C++ unit and
# integration tests (ctest), the deployment checks, and the container image (built with podman
# and smoke-tested: ~2-4 min with warm podman caches; VTW_IMAGE_TEST=0 skips it, e.g. on a host
# where podman cannot run). Exit status is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
echo "[test] deployment checks" >&2
scripts/check-deploy.sh
echo "[test] ctest" >&2
(cd build && ctest --output-on-failure -j "${VTW_TEST_JOBS:-2}" --timeout 900)
if [ "${VTW_IMAGE_TEST:-1}" = 1 ]; then
  echo "[test] container image: scripts/build-image.sh + scripts/smoke-test-image.sh" >&2
  scripts/build-image.sh
  scripts/smoke-test-image.sh
else
  echo "[test] container image: skipped (VTW_IMAGE_TEST=${VTW_IMAGE_TEST})" >&2
fi
echo "[test] all passed" >&2
