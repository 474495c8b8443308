#!/usr/bin/env bash
# The accuracy / compute report of a model: VTW at every withdrawal layer K on a held-out test
# split and on an independent set drawn by another renderer (cairo:
# scripts/make-independent-eval.py), the FLOPs of a whole request by phase (vision, prefill,
# decode), the KL calibration of K, the attention-sink study and the information-migration check.
# Writes docs/REPORT.md (and its SVG plots in docs/report/) from scratch; nothing else changes
# (the model directory is only read).
#
#   scripts/vtw-report.sh [MODEL_DIR]            # default models/vtw-shapes; run from the repo root
#
# Options (or the environment variables in brackets):
#   --out FILE       report path [VTW_REPORT_OUT], default docs/REPORT.md; plots go to
#                    $(dirname FILE)/report/
#   --bin FILE       the vtw binary [VTW_BIN], default build/vtw
#   --count N        test questions [VTW_REPORT_COUNT], default 900
#   --calib-count N  calibration-split questions generated [VTW_REPORT_CALIB_COUNT], default 300
#   --samples N      calibration samples (the paper uses ~20) [VTW_REPORT_SAMPLES], default 20
#   --study N        attention-study samples [VTW_REPORT_STUDY], default 300
#   --independent N  questions of the independent (cairo) set [VTW_REPORT_INDEPENDENT], default
#                    900 (seed 11; needs Debian's python3-cairo); 0 skips it
#   --threads N      CPU threads (0 = all cores) [VTW_THREADS], default 1 (faster than 2 for
#                    these small models, and robust when other jobs share the cores)
#   --work DIR       keep the generated data and JSON results there (default: a temp dir, removed)
#
# Data: the test split is `vtw dataset --split test --seed 7` and the calibration data
# `--split val --seed 7`: a split/seed pair never used for training (the trainer uses the train
# split; splits are disjoint by construction). Calibration never sees the test questions.
set -euo pipefail

MODEL=""
OUT="${VTW_REPORT_OUT:-docs/REPORT.md}"
BIN="${VTW_BIN:-build/vtw}"
COUNT="${VTW_REPORT_COUNT:-900}"
CALIB_COUNT="${VTW_REPORT_CALIB_COUNT:-300}"
SAMPLES="${VTW_REPORT_SAMPLES:-20}"
STUDY="${VTW_REPORT_STUDY:-300}"
INDEPENDENT="${VTW_REPORT_INDEPENDENT:-900}"
INDEPENDENT_SEED=11
THREADS="${VTW_THREADS:-1}"
WORK=""
SEED=7

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --count) COUNT="$2"; shift 2 ;;
    --calib-count) CALIB_COUNT="$2"; shift 2 ;;
    --samples) SAMPLES="$2"; shift 2 ;;
    --study) STUDY="$2"; shift 2 ;;
    --independent) INDEPENDENT="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "vtw-report: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) if [[ -n "$MODEL" ]]; then echo "vtw-report: one MODEL_DIR only" >&2; exit 2; fi
       MODEL="$1"; shift ;;
  esac
done
MODEL="${MODEL:-models/vtw-shapes}"

if [[ ! -x "$BIN" ]]; then
  echo "vtw-report: $BIN is not built (cmake --build build --target vtw, or --bin FILE)" >&2
  exit 1
fi
if [[ ! -f "$MODEL/config.json" ]]; then
  echo "vtw-report: $MODEL is not a model directory (no config.json)" >&2
  exit 1
fi
command -v python3 >/dev/null || { echo "vtw-report: python3 is needed for the plots" >&2; exit 1; }
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CLEANUP=""
if [[ -z "$WORK" ]]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/vtw-report.XXXXXX")"
  CLEANUP="$WORK"
fi
trap '[[ -n "$CLEANUP" ]] && rm -rf "$CLEANUP"' EXIT
mkdir -p "$WORK/data"

step() { echo "== $*" >&2; }
run() {  # run NAME CMD...: stdout to $WORK/NAME.json, the command line recorded
  local name="$1"; shift
  printf '%q ' "$@" | sed 's/ $//' >"$WORK/$name.cmd"
  local t0=$SECONDS
  "$@" >"$WORK/$name.json"
  echo $((SECONDS - t0)) >"$WORK/$name.seconds"
}

COMMON=(--model "$MODEL" --threads "$THREADS")

step "test split: $COUNT questions (split test, seed $SEED)"
"$BIN" dataset --out "$WORK/data" --split test --seed "$SEED" --count "$COUNT" >&2
step "calibration split: $CALIB_COUNT questions (split val, seed $SEED)"
"$BIN" dataset --out "$WORK/data" --split val --seed "$SEED" --count "$CALIB_COUNT" >&2
TEST="$WORK/data/test.jsonl"
CALIB="$WORK/data/val.jsonl"

step "eval: image tokens withdrawn at every K"
run eval_withdraw "$BIN" eval "${COMMON[@]}" --data "$TEST" --vtw-layer all --json
step "eval: text->image attention blocked in layers < K (information migration)"
run eval_block "$BIN" eval "${COMMON[@]}" --data "$TEST" --vtw-layer all --image-mode block --json
step "eval: blank (background-only) image, full model"
run eval_blank "$BIN" eval "${COMMON[@]}" --data "$TEST" --vtw-layer off --image-mode blank --json
step "calibrate: first $SAMPLES samples, eta 0.003 0.01 0.05"
run calib "$BIN" calibrate "${COMMON[@]}" --data "$CALIB" --samples "$SAMPLES" \
  --eta 0.003 --eta 0.01 --eta 0.05 --json
step "calibrate: first $SAMPLES samples per question type"
run calib_by_type "$BIN" calibrate "${COMMON[@]}" --data "$CALIB" --samples "$SAMPLES" --by-type \
  --eta 0.003 --eta 0.01 --eta 0.05 --json
if [[ "$INDEPENDENT" -gt 0 ]]; then
  step "independent set: $INDEPENDENT questions drawn with cairo (seed $INDEPENDENT_SEED)"
  /usr/bin/python3 "$SCRIPT_DIR/make-independent-eval.py" --out "$WORK/independent" \
    --count "$INDEPENDENT" --seed "$INDEPENDENT_SEED" >&2
  step "eval: independent set, image tokens withdrawn at every K"
  run eval_independent "$BIN" eval "${COMMON[@]}" --data "$WORK/independent/independent.jsonl" \
    --vtw-layer all --json
fi
step "whole request by phase: vtw generate --json on the first test question (default max-new-tokens)"
FIRST=$(python3 -c 'import json,os,sys
e = json.loads(open(sys.argv[1]).readline())
print(os.path.join(os.path.dirname(sys.argv[1]), e["image"])); print(e["question"])' "$TEST")
FIRST_IMAGE=$(printf '%s\n' "$FIRST" | sed -n 1p)
FIRST_QUESTION=$(printf '%s\n' "$FIRST" | sed -n 2p)
run generate_default "$BIN" generate "${COMMON[@]}" --image "$FIRST_IMAGE" --prompt "$FIRST_QUESTION" --json
step "attention-sink study: $STUDY samples"
run study "$BIN" study "${COMMON[@]}" --data "$TEST" --samples "$STUDY" --json

cat >"$WORK/meta.json" <<EOF
{"model": "$MODEL", "binary": "$BIN", "test_count": $COUNT, "calib_count": $CALIB_COUNT,
 "seed": $SEED, "samples": $SAMPLES, "study": $STUDY, "threads": "$THREADS",
 "test_jsonl": "$TEST", "calib_jsonl": "$CALIB",
 "independent_count": $INDEPENDENT, "independent_seed": $INDEPENDENT_SEED,
 "git": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)",
 "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "host_cpus": $(nproc)}
EOF
step "writing $OUT"
# The primary eta (its K is "the calibrated K"): the one the model's vtw.json was calibrated at,
# else the paper's 0.003.
ETA=$(python3 -c 'import json,sys
try: print(json.load(open(sys.argv[1])).get("eta", 0.003))
except OSError: print(0.003)' "$MODEL/vtw.json")
python3 "$SCRIPT_DIR/plot_report.py" --work "$WORK" --out "$OUT" --eta "$ETA"
echo "$OUT" >&2
