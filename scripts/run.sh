#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds, and runs vtw-server on the shipped model
# (models/vtw-shapes): gRPC on 0.0.0.0:50051, metrics on 0.0.0.0:9090/metrics. Extra arguments go
# to vtw-server (see `build/vtw-server --help`); every flag also has a VTW_* environment variable.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
args=()
if [ ! -f models/vtw-shapes/config.json ] && [ -z "${VTW_MODEL:-}" ]; then
  echo "[run] the shipped model models/vtw-shapes is not there; serving the tiny HF test model" >&2
  args=(--model tests/data/oracle/tiny-llava)
fi
exec build/vtw-server "${args[@]}" "$@"
