#!/usr/bin/env bash
# Old vs new build, performance: runs `vtw_perf_bench` of two builds alternately (old, new, old,
# new, ...) so that both see the same machine state, then prints per metric the median of each
# and the ratio new/old of the medians (time: < 1 is faster; throughput: > 1 is faster).
# Usage: scripts/ab-perf.sh OLD_BENCH NEW_BENCH ROUNDS OUT_DIR -- [vtw_perf_bench args...]
#   e.g. scripts/ab-perf.sh old/vtw_perf_bench new/vtw_perf_bench 3 docs/perf/ab-medium -- \
#          --geometry medium --reps 5
set -euo pipefail
old=$1 new=$2 rounds=$3 out=$4
shift 4
[[ ${1:-} == -- ]] && shift
mkdir -p "$out"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for ((r = 1; r <= rounds; ++r)); do
  for b in old new; do
    bin=$old; [[ $b == new ]] && bin=$new
    echo "[ab-perf] round $r/$rounds: $b ($bin $*)" >&2
    "$bin" "$@" --json "$out/$b-$r.json" > "$out/$b-$r.txt" 2> "$out/$b-$r.err"
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def metrics(j):
    m = {}
    for dtype, d in j["models"].items():
        p = d["prefill"]
        m[f"{dtype} prefill VTW off (s)"] = p["median_off"]
        m[f"{dtype} prefill K={d['k']} (s)"] = p["median_k"]
        m[f"{dtype} vision (s)"] = d["vision"]["median_seconds"]
        for dec in d.get("decode", []):
            impl = dec.get("decode_attention", "fused")
            m[f"{dtype} decode batch {dec['batch']} K={dec['k']} {impl} (tokens/s)"] = dec["tokens_per_s"]
    return m
runs = {b: [metrics(json.load(open(f"{out}/{b}-{r}.json"))) for r in range(1, rounds + 1)]
        for b in ("old", "new")}
lines = [f"{'metric':58s} {'old':>10s} {'new':>10s} {'new/old':>8s}"]
for key in runs["old"][0]:
    o = statistics.median(r[key] for r in runs["old"])
    n = statistics.median(r[key] for r in runs["new"])
    lines.append(f"{key:58s} {o:10.4f} {n:10.4f} {n / o:8.3f}")
text = "\n".join(lines) + f"\n(medians of {rounds} alternated runs each)\n"
open(f"{out}/summary.txt", "w").write(text)
print(text)
PY
