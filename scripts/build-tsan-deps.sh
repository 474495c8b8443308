#!/usr/bin/env bash
# Builds ThreadSanitizer-instrumented copies of the gRPC and abseil shared libraries that the
# project links, from the Debian source packages of exactly the installed versions, so that
# `scripts/sanitize.sh tsan` can run the gRPC-using tests with gRPC's own synchronisation visible
# to TSan (docs/RELIABILITY.md#sanitizers).
#
# The copies have the same sonames and ABI as the installed packages (same upstream version, same
# Debian patches, e.g. abseil's inline namespace and its non-std absl::optional), so the test
# binaries of build-tsan/ need no relink: `LD_LIBRARY_PATH=build-tsan-deps/lib` makes the dynamic
# loader pick the instrumented libraries instead of /usr/lib's. The __tsan_* entry points the
# libraries call resolve to the TSan runtime that clang links into each executable.
#
# Usage: scripts/build-tsan-deps.sh [--fetch-only]   (a full build: estimated 40-60 min on 2 cores;
#        progress on stderr. --fetch-only downloads, checks and unpacks the sources, builds nothing)
# Env:   TSAN_DEPS_DIR   output (default build-tsan-deps/; lib/ holds the libraries)
#        TSAN_DEPS_JOBS  build parallelism (default: nproc)
#        DEBIAN_MIRROR   source mirror (default http://deb.debian.org/debian)
# Needs: clang (14), cmake, ninja, dpkg-source (dpkg-dev), curl, root for apt-get of libprotoc-dev, the -dev packages of
# scripts/install-deps.sh (protobuf, c-ares, re2, openssl, zlib stay the system ones).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${TSAN_DEPS_DIR:-$ROOT/build-tsan-deps}
JOBS=${TSAN_DEPS_JOBS:-$(nproc)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SRC=$OUT/src
PREFIX=$OUT/prefix
LIB=$OUT/lib
T0=$SECONDS

log() { echo "[build-tsan-deps] $(date +%T) $*" >&2; }
die() { echo "[build-tsan-deps] ERROR: $*" >&2; exit 1; }
for tool in clang clang++ cmake ninja dpkg-source curl sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install clang cmake ninja-build dpkg-dev curl)"
done

# Source package and version of the installed binary package that owns a library.
source_of() {
  dpkg-query -W -f='${source:Package} ${source:Version}' "$1" 2>/dev/null ||
    die "package $1 is not installed (scripts/install-deps.sh)"
}

# Downloads SOURCE_VERSION's .dsc and files from the mirror's pool, checks them against the
# .dsc's SHA-256 sums and unpacks them (dpkg-source applies the Debian patches). Prints the dir.
fetch_source() {  # package version
  local pkg=$1 ver=$2 prefix dir dsc f sum
  case "$pkg" in lib*) prefix=${pkg:0:4} ;; *) prefix=${pkg:0:1} ;; esac
  dir="$SRC/${pkg}-${ver}"
  if [ -f "$dir/.unpacked" ]; then echo "$dir/tree"; return; fi
  rm -rf "$dir"; mkdir -p "$dir"
  dsc="${pkg}_${ver#*:}.dsc"
  log "fetching $pkg $ver from $MIRROR"
  curl -fsS -o "$dir/$dsc" "$MIRROR/pool/main/$prefix/$pkg/$dsc" || die "cannot download $dsc"
  # The Checksums-Sha256 field: " SUM SIZE NAME" lines.
  while read -r sum f; do
    curl -fsS -o "$dir/$f" "$MIRROR/pool/main/$prefix/$pkg/$f" || die "cannot download $f"
    echo "$sum  $dir/$f" | sha256sum -c --quiet - || die "$f: SHA-256 differs from $dsc"
  done < <(awk '/^Checksums-Sha256:/{f=1;next} f&&/^ /{print $1, $3; next} f{f=0}' "$dir/$dsc")
  (cd "$dir" && dpkg-source --no-check -x "$dsc" tree >/dev/null) || die "dpkg-source -x $dsc failed"
  touch "$dir/.unpacked"
  echo "$dir/tree"
}

FLAGS="-O1 -gline-tables-only -fsanitize=thread -fno-omit-frame-pointer"
CMAKE_COMMON=(-G Ninja -DCMAKE_BUILD_TYPE=None -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++
  "-DCMAKE_C_FLAGS=$FLAGS" "-DCMAKE_CXX_FLAGS=$FLAGS" -DCMAKE_CXX_STANDARD=17
  -DBUILD_SHARED_LIBS=ON -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_LIBDIR=lib)
if command -v ccache >/dev/null; then
  CMAKE_COMMON+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

# Ninja's "[n/m]" lines, one in 25 (and the last), so long builds show progress without flooding.
progress() { awk '/^\[[0-9]+\/[0-9]+\]/{n++; if (n % 25 == 0) {print; fflush()}; next} {print; fflush()}' >&2; }

read -r ABSL_PKG ABSL_VER <<<"$(source_of libabsl-dev)"
read -r GRPC_PKG GRPC_VER <<<"$(source_of libgrpc++-dev)"
if [ "${1:-}" = --fetch-only ]; then
  log "abseil sources: $(fetch_source "$ABSL_PKG" "$ABSL_VER")"
  log "gRPC sources: $(fetch_source "$GRPC_PKG" "$GRPC_VER")"
  exit 0
fi

# --- abseil ------------------------------------------------------------------------------------
if [ -f "$PREFIX/.absl-$ABSL_VER" ]; then
  log "abseil $ABSL_VER: already built"
else
  tree=$(fetch_source "$ABSL_PKG" "$ABSL_VER")
  log "abseil $ABSL_VER: configure + build (-j$JOBS, $FLAGS)"
  t=$SECONDS
  cmake -S "$tree" -B "$OUT/absl-build" "${CMAKE_COMMON[@]}" -DABSL_PROPAGATE_CXX_STD=ON >/dev/null
  cmake --build "$OUT/absl-build" -j "$JOBS" 2>&1 | progress
  cmake --install "$OUT/absl-build" >/dev/null
  touch "$PREFIX/.absl-$ABSL_VER"
  log "abseil: built in $((SECONDS - t)) s"
fi

# --- gRPC (the libraries we link; codegen on only because grpc++_reflection needs it) --------
GRPC_TARGETS=(grpc++ grpc++_reflection)
if [ -f "$PREFIX/.grpc-$GRPC_VER" ]; then
  log "gRPC $GRPC_VER: already built"
else
  tree=$(fetch_source "$GRPC_PKG" "$GRPC_VER")
  log "gRPC $GRPC_VER: configure + build ${GRPC_TARGETS[*]} (-j$JOBS, $FLAGS)"
  t=$SECONDS
  # grpc++_reflection's generated code needs gRPC's own grpc_cpp_plugin, built against libprotoc.
  if [ ! -f /usr/include/google/protobuf/compiler/code_generator.h ]; then
    log "installing libprotoc-dev (gRPC's code generator needs it)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libprotoc-dev >&2 ||
      die "apt-get install libprotoc-dev failed"
  fi
  cmake -S "$tree" -B "$OUT/grpc-build" "${CMAKE_COMMON[@]}" -DCMAKE_PREFIX_PATH="$PREFIX" \
    -DgRPC_ABSL_PROVIDER=package -DgRPC_CARES_PROVIDER=package -DgRPC_PROTOBUF_PROVIDER=package \
    -DgRPC_RE2_PROVIDER=package -DgRPC_SSL_PROVIDER=package -DgRPC_ZLIB_PROVIDER=package \
    -DgRPC_BACKWARDS_COMPATIBILITY_MODE=OFF -DgRPC_BUILD_TESTS=OFF -DgRPC_BUILD_CODEGEN=ON \
    -DgRPC_BUILD_GRPC_CSHARP_PLUGIN=OFF -DgRPC_BUILD_GRPC_NODE_PLUGIN=OFF \
    -DgRPC_BUILD_GRPC_OBJECTIVE_C_PLUGIN=OFF -DgRPC_BUILD_GRPC_PHP_PLUGIN=OFF \
    -DgRPC_BUILD_GRPC_PYTHON_PLUGIN=OFF -DgRPC_BUILD_GRPC_RUBY_PLUGIN=OFF >/dev/null
  cmake --build "$OUT/grpc-build" --target "${GRPC_TARGETS[@]}" -j "$JOBS" 2>&1 | progress
  mkdir -p "$PREFIX/lib"
  find "$OUT/grpc-build" -maxdepth 1 -name 'lib*.so*' -exec cp -a {} "$PREFIX/lib/" \;
  touch "$PREFIX/.grpc-$GRPC_VER"
  log "gRPC: built in $((SECONDS - t)) s"
fi

# --- lib/: exactly the instrumented libraries, checked ------------------------------------------
rm -rf "$LIB"; mkdir -p "$LIB"
cp -a "$PREFIX"/lib/lib*.so* "$LIB/"
# Not a runtime library of ours: grpc_python_plugin / grpc_cpp_plugin (uninstrumented) load it,
# and an instrumented copy on LD_LIBRARY_PATH would break them (the Python client tests run them).
rm -f "$LIB"/libgrpc_plugin_support.so*
n=0
for f in "$LIB"/*.so.*; do
  [ -L "$f" ] && continue
  n=$((n + 1))
done
# The libraries that synchronise (a few tiny abseil ones have no instrumentable function at all).
for name in libgrpc.so libgrpc++.so libgpr.so libabsl_synchronization.so libabsl_base.so; do
  f=$(ls "$LIB/$name".* 2>/dev/null | head -1)
  [ -n "$f" ] || die "$name was not built"
  syms=$(nm -D --undefined-only "$f")  # (not piped into grep -q: SIGPIPE + pipefail)
  [[ $syms == *" __tsan_func_entry"* ]] || die "$f is not TSan-instrumented"
done
# Every gRPC/abseil library the project's binaries load must be in lib/ with the same soname.
bin=""
for b in build-tsan/server_test build/vtw-server; do [ -x "$b" ] && { bin=$b; break; }; done
if [ -n "$bin" ]; then
  missing=$(LD_LIBRARY_PATH=$LIB ldd "$bin" | awk '/(libgrpc|libgpr|libupb|libaddress_sorting|libabsl)/ && $3 !~ "^'"$LIB"'" {print $1}')
  [ -z "$missing" ] || die "$bin would still load these from the system: $missing"
  log "$bin: every gRPC/abseil library resolves to $LIB"
fi
log "OK: $n instrumented libraries in $LIB (abseil $ABSL_VER, gRPC $GRPC_VER) in $((SECONDS - T0)) s"
log "use: LD_LIBRARY_PATH=$LIB (scripts/sanitize.sh tsan does this when $LIB exists)"
