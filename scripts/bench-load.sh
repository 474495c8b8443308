#!/usr/bin/env bash
# Server load benchmark (docs/PERFORMANCE.md): starts vtw-server on a model, runs
# build-perf/load_bench against it (N concurrent streaming clients, VTW off / calibrated K /
# per-request K mix, at several load levels, then the serving overhead at batch 1), writes
# docs/perf/load-<label>.{json,csv} and the SVG plots. Two models:
#   shapes  the shipped model (models/vtw-shapes, fp32, 64 image tokens, 6 layers)
#   medium  a random-weight LLaVA-1.5-shaped model written by vtw_perf_bench --write-model
#           (576 image tokens, 8-layer 1024-wide Llama, served in bf16)
# plus "budget": the shipped model with a small KV-cache budget, to count how many requests the
# engine admits at once with and without withdrawal, and "http": the shipped model at batch 1,
# HTTP_ROUNDS rounds (default 100) of the same request as gRPC unary / stream and HTTP unary /
# SSE, interleaved (the HTTP front's overhead next to gRPC's).
#
#   scripts/bench-load.sh                        # everything (about 12 minutes on 2 cores)
#   MODELS="shapes" SECONDS_PER_LEVEL=5 scripts/bench-load.sh
#   MODELS=http scripts/bench-load.sh            # HTTP vs gRPC at batch 1 only (~1 minute)
# Env: BUILD (build-perf), OUT (docs/perf), WORK (/tmp/vtw-bench-load), MODELS (shapes budget
# medium), CLIENTS (1,2,4,8), SECONDS_PER_LEVEL (20), MAX_NEW_TOKENS (16), THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-perf}
OUT=${OUT:-docs/perf}
WORK=${WORK:-/tmp/vtw-bench-load}
MODELS=${MODELS:-shapes budget medium http}
CLIENTS=${CLIENTS:-1,2,4,8}
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-20}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}
THREADS=${THREADS:-$(nproc)}
PORT=${PORT:-50061}
MPORT=${MPORT:-9191}
HPORT=${HPORT:-8181}
HTTP_ROUNDS=${HTTP_ROUNDS:-100}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$WORK" "$OUT"

for bin in vtw vtw-server load_bench vtw_perf_bench; do
  [[ -x $BUILD/$bin ]] || { echo "missing $BUILD/$bin: ninja -C $BUILD $bin" >&2; exit 1; }
done
DATA=$WORK/ds/test.jsonl
[[ -f $DATA ]] || "$BUILD/vtw" dataset --out "$WORK/ds" --split test --count 200 --seed 7

SERVER_PID=
stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap stop_server EXIT

# start_server LABEL MODEL_DIR [server flags...]
start_server() {
  local label=$1 model=$2
  shift 2
  "$BUILD/vtw-server" --model "$model" --listen "127.0.0.1:$PORT" \
    --metrics-listen "127.0.0.1:$MPORT" --http-listen "127.0.0.1:$HPORT" --threads "$THREADS" "$@" >"$WORK/server-$label.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 240); do
    if "$BUILD/vtw" client --addr "127.0.0.1:$PORT" --health >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server-$label.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "vtw-server did not become healthy" >&2
  exit 1
}

# bench LABEL MODEL_DIR DTYPE [load_bench flags...]
bench() {
  local label=$1 model=$2 dtype=$3
  shift 3
  echo "== $label: $BUILD/load_bench $* ==" >&2
  "$BUILD/load_bench" --addr "127.0.0.1:$PORT" --metrics "127.0.0.1:$MPORT" --data "$DATA" \
    --model "$model" --dtype "$dtype" --threads "$THREADS" --max-new-tokens "$MAX_NEW_TOKENS" \
    --label "$label" --out "$OUT/load-$label" "$@" | tee "$OUT/load-$label.txt"
}

for m in $MODELS; do
  case $m in
    shapes)
      start_server shapes models/vtw-shapes
      bench shapes models/vtw-shapes fp32 --clients "$CLIENTS" --seconds "$SECONDS_PER_LEVEL" \
        --modes off,default,mix --overhead 30
      stop_server ;;
    budget)
      # 4 MB of KV cache: about 8 requests' reservations with VTW off (6 layers x ~105 tokens x
      # 768 bytes); 24 clients keep the queue full, vtw_requests_running shows how many fit.
      start_server budget models/vtw-shapes --kv-cache-bytes 4000000 --max-running 64
      bench budget models/vtw-shapes fp32 --clients 24 --seconds "$(( SECONDS_PER_LEVEL / 2 ))" \
        --modes off,default,mix,0 --kv-budget-bytes 4000000
      stop_server ;;
    medium)
      [[ -f $WORK/medium-random/model.safetensors ]] ||
        "$BUILD/vtw_perf_bench" --write-model "$WORK/medium-random" --tokenizer-from models/vtw-shapes
      start_server medium "$WORK/medium-random" --dtype bf16
      bench medium "$WORK/medium-random" bf16 --clients "$CLIENTS" --seconds "$SECONDS_PER_LEVEL" \
        --modes off,default,mix --overhead 10
      stop_server ;;
    http)
      start_server http models/vtw-shapes
      bench http models/vtw-shapes fp32 --modes none --overhead "$HTTP_ROUNDS" \
        --http "127.0.0.1:$HPORT"
      stop_server ;;
    *) echo "unknown model $m (shapes, budget, medium, http)" >&2; exit 2 ;;
  esac
done
python3 scripts/plot_perf.py "$OUT"
