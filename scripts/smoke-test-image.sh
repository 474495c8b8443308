#!/usr/bin/env bash
# Smoke-tests the vtw-serve image: starts vtw-server from it, checks that it runs as the
# non-root user with the shipped model and that every shared library resolves (ldd), calls it
# with the client (health, one Generate) and over HTTP, checks the answers and /metrics, then
# stops it with SIGTERM (graceful drain).
#
# The server runs with `buildah from IMAGE` + `buildah run --isolation=chroot` (plain
# `podman run` fails on cgroups / rlimits on hosts like this one); chroot isolation shares the
# host's network namespace, so the client reaches it on 127.0.0.1. Free ports are picked, so a
# server already on 50051/9090 does not matter.
#
# Usage: scripts/smoke-test-image.sh
# Env:   VTW_IMAGE     image (default vtw-serve:latest)
#        VTW_CLIENT    client binary (default build/vtw; the image's own vtw when that is missing)
#        VTW_SMOKE_IMAGE_FILE / VTW_SMOKE_PROMPT   the request (default: a red circle, "What color is the circle?")
#        VTW_SMOKE_TIMEOUT  seconds to wait for SERVING (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${VTW_IMAGE:-vtw-serve:latest}
CLIENT=${VTW_CLIENT:-build/vtw}
IMG=${VTW_SMOKE_IMAGE_FILE:-tests/data/oracle/images/red_circle.png}
PROMPT=${VTW_SMOKE_PROMPT:-What color is the circle?}
WAIT_S=${VTW_SMOKE_TIMEOUT:-300}
SUDO=()
if [ "$(id -u)" != 0 ]; then SUDO=(sudo); fi

log() { echo "[smoke-test-image] $(date +%T) $*" >&2; }
fail() { echo "[smoke-test-image] FAIL: $*" >&2; exit 1; }
T0=$(date +%s)

command -v buildah >/dev/null || fail "buildah is not installed (scripts/build-image.sh installs it)"
command -v curl >/dev/null || fail "curl is not installed"
"${SUDO[@]}" buildah inspect --type image "$IMAGE" >/dev/null 2>&1 ||
  fail "no image $IMAGE (build it: scripts/build-image.sh)"
[ -f "$IMG" ] || fail "no request image $IMG"

WORK=$(mktemp -d)
CTR=""
SERVER_PID=""
cleanup() {
  set +e
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then stop_server KILL; fi
  [ -n "$CTR" ] && "${SUDO[@]}" buildah rm "$CTR" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

# The processes under buildah run (buildah -> runtime helper -> vtw-server), by parent pid.
descendants() {
  local p c
  for p in "$@"; do
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do echo "$c"; descendants "$c"; done
  done
}
# Sends SIG to the vtw-server process itself (buildah run does not forward signals; buildah
# then exits with the server's status), then waits for buildah run to end (drain: <= 30 s).
stop_server() {
  local sig=$1 pids p sent=""
  pids=$(descendants "$SERVER_PID")
  for p in $pids; do
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = vtw-server ]; then kill -"$sig" "$p" 2>/dev/null && sent=1; fi
  done
  [ -n "$sent" ] || kill -"$sig" "$SERVER_PID" 2>/dev/null
  for _ in $(seq 1 45); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
  for p in $pids "$SERVER_PID"; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  SERVER_RC=0
  wait "$SERVER_PID" 2>/dev/null || SERVER_RC=$?
  SERVER_PID=""
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p
  for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 20000))
    if port_free "$p" && [ "$p" != "${1:-}" ]; then echo "$p"; return; fi
  done
  fail "no free port found"
}
GRPC_PORT=$(pick_port)
METRICS_PORT=$(pick_port "$GRPC_PORT")
HTTP_PORT=$(pick_port "$METRICS_PORT")

CTR=$("${SUDO[@]}" buildah from --pull-never "$IMAGE")
log "container $CTR from $IMAGE"
RUN=("${SUDO[@]}" buildah run --isolation=chroot "$CTR" --)

# The image's user and model (buildah run applies the image's USER and ENV).
uid=$("${RUN[@]}" id -u) || fail "cannot run a command in $IMAGE"
[ "$uid" = 10001 ] || fail "the image runs as uid $uid, not 10001"
# shellcheck disable=SC2016  # expanded in the container
model=$("${RUN[@]}" sh -c 'echo "$VTW_MODEL"; test -f "$VTW_MODEL/config.json" && echo ok' || true)
[ "$(printf '%s\n' "$model" | tail -1)" = ok ] ||
  fail "VTW_MODEL ($(printf '%s\n' "$model" | head -1)) has no config.json in the image"
blas=$("${RUN[@]}" readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 || true)
case "$blas" in *openblas*) ;; *) fail "libblas.so.3 in the image is $blas, not OpenBLAS" ;; esac
# The runtime stage holds only the libraries collected from ldd: every one must resolve.
missing=$("${RUN[@]}" sh -c 'ldd /usr/local/bin/vtw-server /usr/local/bin/vtw | grep "not found" || true')
[ -z "$missing" ] || fail "libraries missing from the image: $missing"
nlibs=$("${RUN[@]}" sh -c 'ldd /usr/local/bin/vtw-server | wc -l')
log "runs as uid $uid, VTW_MODEL=$(printf '%s\n' "$model" | head -1), libblas.so.3 -> $blas"
log "ldd: all $nlibs libraries of vtw-server resolve in the image"

# The client: build/vtw on the host, or the image's vtw in a second buildah run.
if [ -x "$CLIENT" ]; then
  CLIENT_CMD=("$CLIENT")
  REQ_IMG=$IMG
else
  log "no $CLIENT: using the image's vtw as the client"
  CLIENT_CMD=("${RUN[@]}" vtw)
  cp "$IMG" "$WORK/request.png"
  "${SUDO[@]}" buildah copy "$CTR" "$WORK/request.png" /tmp/request.png >/dev/null
  REQ_IMG=/tmp/request.png
fi

log "starting vtw-server (gRPC 127.0.0.1:$GRPC_PORT, metrics 127.0.0.1:$METRICS_PORT)"
T_START=$(date +%s)
"${RUN[@]}" vtw-server --listen "127.0.0.1:$GRPC_PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
  --http-listen "127.0.0.1:$HTTP_PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
show_log() { echo "----- vtw-server log (last 40 lines) -----" >&2; tail -40 "$WORK/server.log" >&2; }

ready=""
for _ in $(seq 1 "$WAIT_S"); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then show_log; fail "vtw-server exited during start-up"; fi
  if "${CLIENT_CMD[@]}" client --addr "127.0.0.1:$GRPC_PORT" --health --timeout 2 >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 1
done
[ -n "$ready" ] || { show_log; fail "not SERVING after ${WAIT_S} s"; }
log "SERVING after $(( $(date +%s) - T_START )) s"

T_REQ=$(date +%s)
answer=$("${CLIENT_CMD[@]}" client --addr "127.0.0.1:$GRPC_PORT" --image "$REQ_IMG" --prompt "$PROMPT" \
  --max-new-tokens 16 --json --timeout 120 2>"$WORK/client.err") ||
  { cat "$WORK/client.err" >&2; show_log; fail "Generate failed"; }
log "Generate answered in $(( $(date +%s) - T_REQ )) s: $answer"
printf '%s' "$answer" | grep -q '"text":"[^"]' || { show_log; fail "empty answer text"; }
printf '%s' "$answer" | grep -Eq '"finish_reason":"FINISH_REASON_(EOS|LENGTH|STOP)"' ||
  { show_log; fail "no finish reason in the answer"; }

# The OpenAI-compatible HTTP front, as curl users call it.
python3 - "$IMG" "$PROMPT" > "$WORK/chat.json" <<'PY'
import base64, json, sys
url = "data:image/png;base64," + base64.b64encode(open(sys.argv[1], "rb").read()).decode()
print(json.dumps({"messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": sys.argv[2]}]}],
    "max_tokens": 16}))
PY
chat=$(curl -sS --max-time 120 -H 'Content-Type: application/json' -d @"$WORK/chat.json" \
  "http://127.0.0.1:$HTTP_PORT/v1/chat/completions") || { show_log; fail "POST /v1/chat/completions failed"; }
printf '%s' "$chat" | grep -q '"object":"chat.completion"' ||
  { echo "$chat" >&2; show_log; fail "no chat.completion from HTTP"; }
log "HTTP /v1/chat/completions answered: $chat"

metrics=$(curl -sS --max-time 10 "http://127.0.0.1:$METRICS_PORT/metrics") ||
  { show_log; fail "GET /metrics failed"; }
printf '%s\n' "$metrics" | grep -Eq '^vtw_requests_total\{code="OK",protocol="grpc"\} 1(\.0+)?$' || {
  printf '%s\n' "$metrics" | grep '^vtw_requests_total' >&2
  fail '/metrics has no vtw_requests_total{code="OK"} 1'
}
log '/metrics: vtw_requests_total{code="OK"} 1'

log "stopping vtw-server (SIGTERM)"
stop_server TERM
[ "$SERVER_RC" = 0 ] || { show_log; fail "vtw-server exited with status $SERVER_RC after SIGTERM (expected 0)"; }
log "vtw-server drained and exited 0"
log "PASS in $(( $(date +%s) - T0 )) s"
