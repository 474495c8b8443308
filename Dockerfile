# vtw-serve: the gRPC server (vtw-server) and the `vtw` tool with the shipped model.
#
#   scripts/build-image.sh          # podman build --isolation=chroot (no Docker engine needed)
#   docker build -t vtw-serve .     # anywhere with Docker
#   docker run --rm -p 50051:50051 -p 8080:8080 -p 9090:9090 vtw-serve [--dtype bf16 ...]
#
# Three stages on Debian 12: `build` compiles with the -dev packages; `runtime-packages` installs
# the shared-library packages the binaries need (scripts/check-runtime-deps.sh checks the list
# against `ldd` of the built binaries; it runs in the tests) and collects the libraries the
# binaries load; `runtime` is the bare base with those libraries, the binaries and the model.
# docs/CONTAINER.md has the details.

ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# The build subset of scripts/install-deps.sh (no tests, benchmarks or deployment tools).
# Cache mounts (podman/buildah, Docker BuildKit) keep downloaded .debs and ccache's objects
# between builds; they are not part of any layer.
RUN --mount=type=cache,target=/var/cache/apt/archives,id=vtw-apt-archives,sharing=locked \
    apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config ccache \
      libtorch-dev libopenblas0-openmp \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libopencv-dev libspdlog-dev prometheus-cpp-dev nlohmann-json3-dev libcli11-dev \
      libcpp-httplib-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# .dockerignore lets in only what the build and the image need (sources, CMakeLists.txt, models/).
COPY . .
ARG VTW_BUILD_TYPE=RelWithDebInfo
ARG VTW_BUILD_JOBS=
RUN --mount=type=cache,target=/ccache,id=vtw-ccache \
    export CCACHE_DIR=/ccache \
 && test -f models/vtw-shapes/config.json \
   || { echo "models/vtw-shapes/config.json is missing: the image ships that model" >&2; exit 1; } \
 && cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE="${VTW_BUILD_TYPE}" \
      -DVTW_BUILD_TESTS=OFF -DVTW_BUILD_BENCH=OFF \
 && cmake --build /build --target vtw-server vtw -j "${VTW_BUILD_JOBS:-$(nproc)}" \
 && mkdir -p /out/bin \
 && strip --strip-debug -o /out/bin/vtw-server /build/vtw-server \
 && strip --strip-debug -o /out/bin/vtw /build/vtw

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime-packages
ARG DEBIAN_FRONTEND=noninteractive
# Exactly the packages owning the binaries' direct shared libraries (ldd + dpkg -S), plus
# libopenblas0-openmp so LibTorch's libblas.so.3 is OpenBLAS (the reference BLAS is ~30x slower).
# Keep in sync with the binaries: scripts/check-runtime-deps.sh fails the tests otherwise.
# This stage is not the image: the `runtime` stage below takes from it only the libraries the
# binaries load. /base-files records what the base image already has (path, size, mtime).
RUN --mount=type=cache,target=/var/cache/apt/archives,id=vtw-apt-archives,sharing=locked \
    find / -xdev \( -type f -o -type l \) -printf '%p\t%s\t%Ts\n' > /base-files \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      libtorch1.13 libopenblas0-openmp \
      libopencv-core406 libopencv-imgcodecs406 libopencv-imgproc406 \
      libgrpc++1.51 libgrpc29 libabsl20220623 libprotobuf32 \
      libprometheus-cpp-core1.0 libspdlog1.10 libfmt9 libcpp-httplib0.11 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/bin/ /usr/local/bin/
COPY scripts/collect-runtime-libs.sh /usr/local/sbin/
# The ldd closure of both binaries minus the base image's files (307 of the 339 libraries:
# 524 MB of the ~870 MB that the packages above install); prints the bytes per package.
RUN bash /usr/local/sbin/collect-runtime-libs.sh --base-files /base-files --dest /slim \
      /usr/local/bin/vtw-server /usr/local/bin/vtw

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime
COPY --from=runtime-packages /slim/ /
COPY --from=runtime-packages /etc/ld.so.conf.d/ /etc/ld.so.conf.d/
RUN ldconfig \
 && groupadd --gid 10001 vtw \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vtw

COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /src/models/vtw-shapes/ /opt/vtw/models/vtw-shapes/

ENV VTW_MODEL=/opt/vtw/models/vtw-shapes
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8080 9090
# Kubernetes uses its own gRPC probes (deploy/k8s); this is for docker/podman (docker format).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["vtw", "client", "--addr", "127.0.0.1:50051", "--health", "--timeout", "4"]
ENTRYPOINT ["vtw-server"]
