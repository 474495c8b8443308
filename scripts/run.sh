#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds, and runs the main job. Extra arguments go to the
# program. Until the gRPC server lands this runs `vtw generate` on an example image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
if [ -x build/vtw-server ]; then
  exec build/vtw-server "$@"
fi
exec build/vtw generate --image tests/data/oracle/images/red_circle.png \
  --prompt "What color is the circle?" "$@"
