#!/usr/bin/env bash
# Generates the Python gRPC stubs for vtw.v1 (proto/vtw/v1/inference.proto) and for
# grpc.health.v1 (health.proto here) into OUT_DIR (default: gen/ next to this script):
#   OUT_DIR/vtw/v1/inference_pb2.py, inference_pb2_grpc.py, OUT_DIR/health_pb2.py, health_pb2_grpc.py
# Uses `$PYTHON -m grpc_tools.protoc` when grpcio-tools is installed for $PYTHON (default python3),
# otherwise Debian's `protoc` with `grpc_python_plugin` (apt-get install protobuf-compiler
# protobuf-compiler-grpc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="${1:-$here/gen}"
python="${PYTHON:-python3}"
mkdir -p "$out"

if "$python" -c 'import grpc_tools.protoc' 2>/dev/null; then
  protoc=("$python" -m grpc_tools.protoc)
  plugin=()
elif command -v protoc >/dev/null && command -v grpc_python_plugin >/dev/null; then
  protoc=(protoc)
  plugin=("--plugin=protoc-gen-grpc_python=$(command -v grpc_python_plugin)")
else
  echo "generate_stubs.sh: need grpcio-tools for $python, or protoc and grpc_python_plugin" \
       "(apt-get install protobuf-compiler protobuf-compiler-grpc)" >&2
  exit 1
fi

"${protoc[@]}" "${plugin[@]}" --proto_path="$proto_root" --python_out="$out" \
  --grpc_python_out="$out" "$proto_root/vtw/v1/inference.proto"
"${protoc[@]}" "${plugin[@]}" --proto_path="$here" --python_out="$out" \
  --grpc_python_out="$out" "$here/health.proto"
echo "generate_stubs.sh: stubs in $out" >&2
