#!/usr/bin/env bash
# Old vs new build: the same results, to the bit. Runs the `vtw` of two builds (e.g. the commit
# before a refactor and after it, both Release) on the same inputs and compares what they print
# with timings removed: `vtw generate --json` (every oracle image x K in 0..layers and off, greedy
# and seeded sampling, chunk-free), `vtw eval --vtw-layer all` on a generated test split (withdraw
# and block modes), `vtw calibrate --by-type`, and a short `vtw train` (tiny preset with the
# shipped recipe's stages) compared by the sha256 of model.safetensors and training.json's
# numbers. Exits 1 on the first difference.
# Usage: scripts/ab-equivalence.sh OLD_VTW NEW_VTW [WORK_DIR]
set -euo pipefail
old=$1 new=$2
work=${3:-$(mktemp -d /tmp/vtw-ab.XXXXXX)}
cd "$(dirname "$0")/.."
mkdir -p "$work"
model=${VTW_AB_MODEL:-$PWD/models/vtw-shapes}  # the same directory for both builds
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
strip_times() {  # JSON on stdin -> JSON without timing fields, keys sorted
  python3 -c '
import json, sys
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()
                if not any(t in k for t in ("seconds", "_s", "timing", "elapsed", "per_second"))}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
print(json.dumps(clean(json.load(sys.stdin)), sort_keys=True, indent=1))'
}
same() {  # label file_a file_b
  if cmp -s "$2" "$3"; then echo "[ab] same: $1" >&2; else
    echo "[ab] DIFFERENT: $1" >&2; diff "$2" "$3" | head -20 >&2; exit 1; fi
}
"$new" dataset --out "$work/data" --split test --count 240 --seed 7 >/dev/null 2>&1
n=0
for img in tests/data/oracle/images/*.png; do
  for k in 0 1 2 3 4 5 6 off; do
    for sampling in "" "--temperature 0.8 --top-p 0.9 --seed 11"; do
      n=$((n + 1))
      # shellcheck disable=SC2086
      args=(generate --model "$model" --image "$img" --prompt "What color is the circle?" --vtw-layer "$k"
            --max-new-tokens 8 --ignore-eos --json $sampling)
      "$old" "${args[@]}" 2>/dev/null | strip_times > "$work/gen-old.json"
      "$new" "${args[@]}" 2>/dev/null | strip_times > "$work/gen-new.json"
      same "generate $(basename "$img") K=$k ${sampling:-greedy}" "$work/gen-old.json" "$work/gen-new.json"
    done
  done
done
for mode in withdraw block; do
  for b in old new; do
    bin=$old; [[ $b == new ]] && bin=$new
    "$bin" eval --model "$model" --data "$work/data/test.jsonl" --vtw-layer all --image-mode "$mode" --json \
      --no-progress | strip_times > "$work/eval-$mode-$b.json"
  done
  same "eval --vtw-layer all --image-mode $mode (240 questions)" "$work/eval-$mode-old.json" "$work/eval-$mode-new.json"
done
for b in old new; do
  bin=$old; [[ $b == new ]] && bin=$new
  "$bin" calibrate --model "$model" --data "$work/data/test.jsonl" --samples 10 --by-type --eta 0.003 --eta 0.01 \
    --json --no-progress | strip_times > "$work/calib-$b.json"
done
same "calibrate --by-type (10 per type)" "$work/calib-old.json" "$work/calib-new.json"
for b in old new; do
  bin=$old; [[ $b == new ]] && bin=$new
  rm -rf "$work/train-$b"
  "$bin" train --out "$work/train-$b" --preset tiny --tokenizer models/vtw-shapes \
    --train-count 600 --val-count 60 --questions-per-image 4 --turns 2 --steps 20 --batch-size 6 \
    --aux-patch-loss 1.0 --vision-steps 8 --vision-batch 16 --warmup 4 --eval-every 10 \
    --vtw-train-fraction 0.5 --vtw-train-min-layer 1 --val-vtw-layer 1 --seed 3 --threads 2 \
    >/dev/null 2>&1
  sha256sum < "$work/train-$b/model.safetensors" > "$work/train-$b.sha"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); [j.pop(k,None) for k in ("seconds","trainer")]; print(json.dumps(j, sort_keys=True, indent=1))' \
    "$work/train-$b/training.json" > "$work/train-$b.json"
done
same "train (tiny, vision + multi-turn + VTW-aware): model.safetensors" "$work/train-old.sha" "$work/train-new.sha"
same "train: training.json (curve, validation)" "$work/train-old.json" "$work/train-new.json"
echo "[ab] all the same: $n generate runs, 2 eval modes, calibration, training ($work)" >&2
