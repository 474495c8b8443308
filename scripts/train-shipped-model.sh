#!/usr/bin/env bash
# Trains the shipped model (models/vtw-shapes) from scratch with one command:
#   scripts/train-shipped-model.sh
# 1. builds `vtw` if needed, 2. trains the SentencePiece tokenizer (spm_train) on the task text,
# 3. generates the train/val splits of the synthetic shapes dataset in memory (data seed 1),
# 4. vision stage: 1500 steps of the CLIP tower + projector on dense patch labels (no decoder),
# 5. main stage: 4800 steps of 12 multi-turn sequences (8 questions of one image each), answer
#    loss + the patch-label loss, VTW-aware (half the sequences withdraw the image tokens at a
#    random layer in [2, 5]),
# 6. writes the HF LlavaForConditionalGeneration directory to models/vtw-shapes.
# Progress goes to stderr. 69 min measured on a 2-core machine shared with other jobs; ~39 min
# idle (0.19 s/vision step, 0.39 s/main step measured idle). See docs/TRAINING.md. Then calibrate K:
#   vtw dataset --out D --split val --count 300 --seed 7
#   vtw calibrate --model models/vtw-shapes --data D/val.jsonl --samples 20 --eta 0.01 --write
# Environment: VTW_BIN (the vtw binary; default build/vtw), OUT (default models/vtw-shapes),
# CHECKPOINT_DIR (default build/train-checkpoints), RESUME=1 to continue an interrupted run,
# THREADS (default 2). Extra arguments are passed to `vtw train`.
set -euo pipefail
cd "$(dirname "$0")/.."

VTW_BIN=${VTW_BIN:-build/vtw}
OUT=${OUT:-models/vtw-shapes}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-build/train-checkpoints}
THREADS=${THREADS:-2}

command -v spm_train >/dev/null || {
  echo "spm_train not found: apt-get install sentencepiece" >&2; exit 1; }
if [[ ! -x "$VTW_BIN" ]]; then
  cmake -S . -B build -G Ninja -DVTW_BUILD_BENCH=OFF
  cmake --build build --target vtw -j"$THREADS"
fi

# OpenMP threads that wait passively: spinning workers collapse throughput when the machine is
# shared with other work.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

resume=()
[[ "${RESUME:-0}" == 1 ]] && resume=(--resume)
mkdir -p "$OUT"
start=$(date +%s)
"$VTW_BIN" train \
  --out "$OUT" \
  --preset shipped \
  --tokenizer-vocab 512 \
  --data-seed 1 --train-count 256000 --val-count 600 --questions-per-image 8 --turns 8 \
  --aux-patch-loss 1.0 --vision-steps 1500 --vision-batch 64 \
  --steps 4800 --batch-size 12 \
  --lr 1.5e-3 --warmup 150 --min-lr-ratio 0.05 --weight-decay 0.05 --clip 1.0 \
  --seed 1 --threads "$THREADS" \
  --vtw-train-fraction 0.5 --vtw-train-min-layer 2 \
  --eval-every 400 --val-vtw-layer 3 \
  --checkpoint-dir "$CHECKPOINT_DIR" --checkpoint-every 400 \
  --save-dtype fp32 \
  "${resume[@]}" "$@"
end=$(date +%s)
echo "[train-shipped-model] done in $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s;" \
     "model in $OUT ($(du -sh "$OUT" | cut -f1))" >&2
