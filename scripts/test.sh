#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds into build/, and runs every test: the C++ unit and
# integration tests (ctest) and the deployment checks. Exit status is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
echo "[test] deployment checks" >&2
scripts/check-deploy.sh
if [ "${VTW_IMAGE_TEST:-0}" = 1 ]; then  # slow (image build): enabled by hand or a separate CI step
  echo "[test] container image (build + smoke test)" >&2
  scripts/build-image.sh
  scripts/smoke-test-image.sh
fi
echo "[test] ctest" >&2
cd build
exec ctest --output-on-failure -j "${VTW_TEST_JOBS:-2}" --timeout 900
