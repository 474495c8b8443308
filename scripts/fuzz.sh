#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/*_fuzz.cc) with clang, ASan and UBSan into build-fuzz/ and
# runs each for a bounded time, one after the other; prints executions and findings per target
# and exits non-zero when any target crashed, leaked, hit undefined behaviour, timed out or ran
# out of memory. Crash inputs are kept in build-fuzz/crashes/<target>/; the corpus each run grew
# is kept in build-fuzz/corpus/<target>/ (the seeds in fuzz/corpus/<target>/ are only read).
#
# Usage: scripts/fuzz.sh [TARGET...]        (default: every target)
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_JOBS      build parallelism (default 1)
#   FUZZ_ARGS      extra libFuzzer flags for every target (e.g. "-seed=1")
#
# Not part of CI (scripts/test.sh runs the fuzz inputs through tests/fuzz_regression_test, built
# with the normal compiler). Besides scripts/install-deps.sh it needs, on Debian 12:
#   apt-get install clang libclang-rt-14-dev llvm
# (clang 14, its libFuzzer/ASan/UBSan runtimes, and llvm-symbolizer for readable stack traces).
#
# A finding: reproduce with build-fuzz/<target>_fuzz build-fuzz/crashes/<target>/<file>, fix
# the code, copy the file to tests/data/fuzz_regressions/<target>/ (the regression test runs it).
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
JOBS="${FUZZ_JOBS:-1}"
BUILD=build-fuzz
# -max_len per target; the same values as the registry in fuzz/fuzz_targets.cc (the regression
# test checks that they agree).
declare -A MAX_LEN=(
  [safetensors]=65536
  [shard_index]=16384
  [llava_config]=16384
  [image]=65536
  [tokenizer]=4096
  [tokenizer_model]=16384
  [request]=65536
  [chat_request]=65536
)
ALL_TARGETS=(safetensors shard_index llava_config image tokenizer tokenizer_model request chat_request)

command -v clang++ >/dev/null || { echo "[fuzz] clang++ not found: apt-get install clang libclang-rt-14-dev llvm" >&2; exit 2; }

if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
for t in "${TARGETS[@]}"; do
  [ -n "${MAX_LEN[$t]:-}" ] || { echo "[fuzz] unknown target '$t' (known: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

# -O1 with asserts on (no NDEBUG) and line tables only: fast enough, readable stacks.
echo "[fuzz] configuring $BUILD (clang, VTW_FUZZ=ON)" >&2
mkdir -p "$BUILD"
CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DVTW_FUZZ=ON -DVTW_BUILD_TESTS=OFF \
    -DVTW_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1" >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log" >&2; exit 2; }
targets_to_build=()
for t in "${TARGETS[@]}"; do targets_to_build+=("${t}_fuzz"); done
echo "[fuzz] building ${targets_to_build[*]} (-j$JOBS)" >&2
ninja -C "$BUILD" -j "$JOBS" "${targets_to_build[@]}" || exit 2

symbolizer=$(command -v llvm-symbolizer || command -v llvm-symbolizer-14 || true)
[ -n "$symbolizer" ] && export ASAN_SYMBOLIZER_PATH="$symbolizer"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export OMP_NUM_THREADS=1
export VTW_TEST_DATA_DIR="$PWD/tests/data"

failed=0
summary=()
for t in "${TARGETS[@]}"; do
  corpus="$BUILD/corpus/$t"
  crashes="$BUILD/crashes/$t"
  log="$BUILD/logs/$t.log"
  mkdir -p "$corpus" "$crashes" "$(dirname "$log")"
  echo "[fuzz] $t: ${SECONDS_PER_TARGET}s, -max_len=${MAX_LEN[$t]}" >&2
  # shellcheck disable=SC2086
  "$BUILD/${t}_fuzz" -max_total_time="$SECONDS_PER_TARGET" -max_len="${MAX_LEN[$t]}" \
      -timeout=25 -rss_limit_mb=2560 -malloc_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$crashes/" ${FUZZ_ARGS:-} "$corpus" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  new_units=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  corp=$(grep -o 'corp: [0-9]*/[0-9]*[bKM]*' "$log" | tail -1 | sed 's/corp: //')
  cov=$(grep -o ' cov: [0-9]*' "$log" | tail -1 | sed 's/ cov: //')
  findings=$(find "$crashes" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
             -o -name 'oom-*' -o -name 'slow-unit-*' \) | wc -l)
  if [ "$rc" -ne 0 ] || [ "$findings" -gt 0 ]; then
    failed=1
    status="FAILED (exit $rc, $findings input(s) in $crashes)"
    grep -m1 -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error|FUZZ CHECK FAILED' \
      "$log" >&2 || tail -20 "$log" >&2
  else
    status="ok"
  fi
  line=$(printf '%-16s execs %-10s exec/s %-7s corpus %-12s cov %-6s new %-5s rss %sMB  %s' \
         "$t" "${execs:-?}" "${rate:-?}" "${corp:-?}" "${cov:-?}" "${new_units:-?}" "${rss:-?}" \
         "$status")
  echo "[fuzz] $line" >&2
  summary+=("$line")
done

echo
echo "Fuzzing summary (${SECONDS_PER_TARGET}s per target; logs in $BUILD/logs/):"
for line in "${summary[@]}"; do echo "  $line"; done
exit "$failed"
