#!/usr/bin/env bash
# Installs every build and runtime dependency of vtw-serve on Debian 12 (bookworm) with apt-get.
# Idempotent. Run as root (or with sudo available).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-openmp
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libopencv-dev libspdlog-dev prometheus-cpp-dev sentencepiece libcpp-httplib-dev curl
  nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev libbenchmark-dev
  prometheus python3 python3-grpcio python3-protobuf python3-numpy python3-yaml python3-cairo
  yamllint openssl
)
# kubectl (for `kubectl kustomize` in the deployment checks): Debian's kubernetes-client, unless
# some kubectl is already installed (another package owning /usr/bin/kubectl would conflict).
command -v kubectl >/dev/null || PACKAGES+=(kubernetes-client)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install-deps] installing: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# LibTorch must use OpenBLAS, not the reference BLAS (30x slower GEMM).
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 || true)
case "$blas" in
  *openblas*) ;;
  *) echo "[install-deps] WARNING: libblas.so.3 -> $blas (not OpenBLAS); fp32 GEMM will be slow" >&2 ;;
esac
