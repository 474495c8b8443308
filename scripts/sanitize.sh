#!/usr/bin/env bash
# Builds the unit and integration tests with sanitizers and runs them; exits non-zero when a gating
# test fails or a sanitizer reports anything in one (in the test process or in a vtw-server / vtw
# process it started); every asan test gates, tsan's informational ones (below) do not. docs/RELIABILITY.md#sanitizers has what is covered, the findings and timings.
#
# Usage: scripts/sanitize.sh [asan|tsan|all]      (default: all)
#   asan  build-asan/: clang, -fsanitize=address,undefined (VTW_SANITIZE=ON), -O1, line tables;
#         every tests/*_test.cc binary, LeakSanitizer on, UB fatal.
#   tsan  build-tsan/: clang, -fsanitize=thread (VTW_TSAN=ON), -O1, line tables, OMP_NUM_THREADS=1.
#         Gates on SANITIZE_TSAN_TESTS (default scheduler_test). The gRPC-using threaded tests
#         (SANITIZE_TSAN_INFO_TESTS: server_test, server_ops_test, faults_test, clients_test,
#         security_test) run too, but only informationally: Debian's gRPC is not built with TSan,
#         so TSan cannot see gRPC's hand-offs between its threads and reports hundreds of races at
#         them (docs/RELIABILITY.md#sanitizers); their reports are counted and kept, and do not
#         fail the run unless SANITIZE_TSAN_STRICT=1. With instrumented gRPC and abseil built by
#         scripts/build-tsan-deps.sh (build-tsan-deps/lib; SANITIZE_TSAN_DEPS=DIR/lib elsewhere),
#         those tests load them (LD_LIBRARY_PATH) and gate like scheduler_test.
# Environment:
#   SANITIZE_JOBS        build parallelism (default 1)
#   SANITIZE_ASAN_TESTS  test binaries for asan (default: every tests/*_test.cc)
#   SANITIZE_TSAN_TESTS  test binaries tsan gates on (default: scheduler_test)
#   SANITIZE_TSAN_INFO_TESTS  test binaries tsan runs informationally (default: see below)
#   SANITIZE_TSAN_STRICT  1: the informational tsan tests gate too
#   SANITIZE_TIMEOUT     seconds per test binary (default 2400)
#   ASAN_OPTIONS, UBSAN_OPTIONS, LSAN_OPTIONS, TSAN_OPTIONS: appended to the defaults below
#   (later options win).
#
# Not part of CI (scripts/test.sh): the two builds and runs take far longer than CI's budget on
# the 2-core machine (timings in docs/RELIABILITY.md). Needs clang and its sanitizer runtimes:
#   apt-get install clang libclang-rt-14-dev llvm      (llvm-symbolizer for readable stacks)
#
# Sanitizer reports are written with log_path to BUILD/sanitizer-logs/<test>/report.<pid> (one file
# per reporting process, so reports from child processes are caught too) and printed at the end;
# each test binary's output is in BUILD/sanitizer-logs/<test>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE="${1:-all}"
case "$MODE" in asan|tsan|all) ;; *) echo "usage: $0 [asan|tsan|all]" >&2; exit 2 ;; esac
JOBS="${SANITIZE_JOBS:-1}"
TIMEOUT="${SANITIZE_TIMEOUT:-2400}"

command -v clang++ >/dev/null || { echo "[sanitize] clang++ not found: apt-get install clang libclang-rt-14-dev llvm" >&2; exit 2; }
command -v ninja >/dev/null || { echo "[sanitize] ninja not found (scripts/install-deps.sh)" >&2; exit 2; }

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  ALL_TESTS=$(git ls-files 'tests/*_test.cc' | xargs -n1 basename | sed 's/\.cc$//' | tr '\n' ' ')
else
  ALL_TESTS=$(ls tests/*_test.cc | xargs -n1 basename | sed 's/\.cc$//' | tr '\n' ' ')
fi
# The parts with more than one thread: the engine thread and its queue (server_test runs the
# real gRPC server in-process; scheduler_test the admission and the image cache), the reactors
# and the real vtw-server process (server_ops_test, faults_test, clients_test, security_test).
# With TSan-instrumented gRPC and abseil (scripts/build-tsan-deps.sh -> build-tsan-deps/lib, or
# SANITIZE_TSAN_DEPS=DIR/lib), TSan sees gRPC's own synchronisation: the gRPC-using tests run with
# LD_LIBRARY_PATH pointing there, with scripts/sanitizers/tsan-instrumented-grpc.supp, and gate.
# Without them, they run informationally with scripts/sanitizers/tsan.supp.
TSAN_DEPS_LIB="${SANITIZE_TSAN_DEPS:-$ROOT/build-tsan-deps/lib}"
if [ -d "$TSAN_DEPS_LIB" ] && ls "$TSAN_DEPS_LIB"/libgrpc.so.* >/dev/null 2>&1; then
  TSAN_MODE=instrumented-grpc
  TSAN_TESTS_DEFAULT="scheduler_test server_test server_ops_test faults_test clients_test security_test"
  TSAN_INFO_TESTS_DEFAULT=""
  TSAN_SUPP_FILE=tsan-instrumented-grpc.supp
else
  TSAN_MODE=system-grpc
  TSAN_DEPS_LIB=""
  TSAN_TESTS_DEFAULT="scheduler_test"
  TSAN_INFO_TESTS_DEFAULT="server_test server_ops_test faults_test clients_test security_test"
  TSAN_SUPP_FILE=tsan.supp
fi

# Tests (gtest filters) left out per build, each with the reason printed in the summary.
declare -A EXCLUDE_FILTER=() EXCLUDE_REASON=()
exclude() {  # build test filter reason
  EXCLUDE_FILTER["$1/$2"]="$3"
  EXCLUDE_REASON["$1/$2"]="$4"
}
# ldd of sanitizer binaries is not what the runtime image ships (and the clang runtime is
# static): the check is about the release build, which scripts/test.sh runs it on.
exclude asan runtime_deps_test '*' "checks the release binaries' shared libraries against the runtime image; meaningless for sanitizer builds (run by scripts/test.sh)"

# Debian's python3-grpcio links the system libgrpc: with the instrumented copy on LD_LIBRARY_PATH
# an uninstrumented python3 cannot load it (undefined __tsan_* symbols).
if [ "$TSAN_MODE" = instrumented-grpc ]; then
  exclude tsan clients_test 'PythonClientTest.*:ServerClientsTest.PythonClientAgreesWithVtwClient:ServerClientsTest.ServerErrorsReachTheUser' "python3-grpcio cannot load the TSan-instrumented libgrpc (LD_LIBRARY_PATH); these three tests run python3 clients; scripts/test.sh runs them"
fi

symbolizer=$(command -v llvm-symbolizer || command -v llvm-symbolizer-14 || true)
SUPP="$ROOT/scripts/sanitizers"
export OMP_NUM_THREADS=1          # as ctest runs the tests (CMakeLists.txt); required for TSan
export VTW_TEST_DATA_DIR="$ROOT/tests/data"

summary=()
failed=0

configure_and_build() {  # build_dir sanitizer_option tests...
  local dir=$1 option=$2; shift 2
  local start=$SECONDS
  if [ ! -f "$dir/build.ninja" ]; then
    echo "[sanitize] configuring $dir ($option=ON, clang, -O1)" >&2
    mkdir -p "$dir"
    CC=clang CXX=clang++ cmake -S . -B "$dir" -G Ninja "-D$option=ON" -DVTW_BUILD_BENCH=OFF \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" >"$dir/sanitize-configure.log" 2>&1 \
      || { cat "$dir/sanitize-configure.log" >&2; return 1; }
  fi
  echo "[sanitize] building in $dir (-j$JOBS): vtw-server vtw $*" >&2
  ninja -C "$dir" -j "$JOBS" vtw-server vtw "$@" >&2 || return 1
  echo "[sanitize] $dir built in $((SECONDS - start)) s" >&2
}

# Runs each test binary once (all its cases in one process), counts gtest results and the
# sanitizer report files written under its log directory.
run_tests() {  # kind build_dir gate(1|0) tests...
  local kind=$1 dir=$2 gate=$3; shift 3
  local logs="$dir/sanitizer-logs"
  mkdir -p "$logs"
  # Informational runs: keep going after a report and let the processes exit with their own
  # status (so that the test results say whether the code worked), count the reports.
  local extra_tsan=""
  [ "$gate" = 1 ] || extra_tsan=":halt_on_error=0:exitcode=0"
  local start=$SECONDS total_run=0 total_passed=0 total_failed=0 total_skipped=0 total_reports=0
  local t
  for t in "$@"; do
    local key="$kind/$t" filter="" note=""
    if [ -n "${EXCLUDE_FILTER[$key]:-}" ]; then
      if [ "${EXCLUDE_FILTER[$key]}" = '*' ]; then
        echo "[sanitize] $kind: $t excluded: ${EXCLUDE_REASON[$key]}" >&2
        summary+=("$kind  $t: excluded: ${EXCLUDE_REASON[$key]}")
        continue
      fi
      filter="--gtest_filter=-${EXCLUDE_FILTER[$key]}"
      note=" (excluded ${EXCLUDE_FILTER[$key]}: ${EXCLUDE_REASON[$key]})"
    fi
    rm -rf "${logs:?}/$t" "$logs/$t.log"; mkdir -p "$logs/$t"
    local log="$logs/$t.log" tstart=$SECONDS rc
    echo "[sanitize] $kind: $t$note" >&2
    (
      cd "$dir" || exit 2
      export ASAN_OPTIONS="log_path=$ROOT/$logs/$t/report:$ASAN_DEFAULT${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
      export UBSAN_OPTIONS="log_path=$ROOT/$logs/$t/report:$UBSAN_DEFAULT${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
      export LSAN_OPTIONS="$LSAN_DEFAULT${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
      export TSAN_OPTIONS="log_path=$ROOT/$logs/$t/report:$TSAN_DEFAULT$extra_tsan${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
      # tsan with instrumented gRPC: the test and every vtw-server / vtw it starts load them.
      if [ "$kind" != asan ] && [ -n "$TSAN_DEPS_LIB" ]; then
        export LD_LIBRARY_PATH="$TSAN_DEPS_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      fi
      exec timeout -k 10 "$TIMEOUT" "./$t" $filter
    ) >"$log" 2>&1
    rc=$?
    local passed skipped failed_n ran reports procs
    passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    failed_n=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    ran=$(sed -n 's/^\[==========\] \([0-9]*\) tests\? from .* ran\..*/\1/p' "$log" | tail -1)
    # Processes that wrote a report, and the reports in them.
    procs=$(find "$logs/$t" -type f -name 'report.*' | wc -l)
    reports=0
    if [ "$procs" -gt 0 ]; then
      reports=$(cat "$logs/$t"/report.* | grep -cE 'WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer|runtime error:')
      [ "$reports" -gt 0 ] || reports=$procs
    fi
    passed=${passed:-0}; skipped=${skipped:-0}; failed_n=${failed_n:-0}; ran=${ran:-0}
    # A test binary that died (sanitizer abort, timeout) prints no totals: count it as a failure.
    local status=ok
    if [ "$rc" -ne 0 ] || [ "$failed_n" -gt 0 ] || [ "$reports" -gt 0 ]; then
      status=FAIL
      if [ "$gate" = 1 ]; then failed=1; else status="FAIL(informational, not gated)"; fi
    fi
    [ "$rc" -ne 0 ] && [ "$ran" = 0 ] && failed_n=1
    total_run=$((total_run + ran)); total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed_n)); total_skipped=$((total_skipped + skipped))
    total_reports=$((total_reports + reports))
    summary+=("$kind  $t: $status rc=$rc ran=$ran passed=$passed skipped=$skipped failed=$failed_n sanitizer_reports=$reports (from $procs processes) $((SECONDS - tstart))s$note")
    if [ "$status" != ok ]; then
      echo "[sanitize] $kind: $t $status (rc=$rc, $reports sanitizer report(s) from $procs process(es)); log: $log" >&2
      grep -E '^\[  FAILED  \]' "$log" | sort -u >&2
    fi
    if [ "$status" = FAIL ]; then
      local f
      for f in $(find "$logs/$t" -type f -name 'report.*' | sort | head -5); do
        echo "----- $f (first 60 lines)" >&2
        head -60 "$f" >&2
      done
    fi
  done
  summary+=("$kind  TOTAL$([ "$gate" = 1 ] || echo ' (informational)'): ran=$total_run passed=$total_passed skipped=$total_skipped failed=$total_failed sanitizer_reports=$total_reports, tests took $((SECONDS - start))s")
}

ASAN_DEFAULT="detect_leaks=1:abort_on_error=1:check_initialization_order=1:detect_stack_use_after_return=1"
UBSAN_DEFAULT="print_stacktrace=1:halt_on_error=1:suppressions=$SUPP/ubsan.supp"
LSAN_DEFAULT="suppressions=$SUPP/lsan.supp:print_suppressions=0"
TSAN_DEFAULT="suppressions=$SUPP/$TSAN_SUPP_FILE:halt_on_error=1:second_deadlock_stack=1:history_size=4"
if [ -n "$symbolizer" ]; then
  ASAN_DEFAULT="$ASAN_DEFAULT:external_symbolizer_path=$symbolizer"
  UBSAN_DEFAULT="$UBSAN_DEFAULT:external_symbolizer_path=$symbolizer"
  TSAN_DEFAULT="$TSAN_DEFAULT:external_symbolizer_path=$symbolizer"
fi

if [ "$MODE" = asan ] || [ "$MODE" = all ]; then
  read -r -a tests <<<"${SANITIZE_ASAN_TESTS:-$ALL_TESTS}"
  if configure_and_build build-asan VTW_SANITIZE "${tests[@]}"; then
    rm -rf build-asan/sanitizer-logs
    run_tests asan build-asan 1 "${tests[@]}"
  else
    summary+=("asan  BUILD FAILED"); failed=1
  fi
fi
if [ "$MODE" = tsan ] || [ "$MODE" = all ]; then
  read -r -a tests <<<"${SANITIZE_TSAN_TESTS:-$TSAN_TESTS_DEFAULT}"
  read -r -a info_tests <<<"${SANITIZE_TSAN_INFO_TESTS-$TSAN_INFO_TESTS_DEFAULT}"
  if configure_and_build build-tsan VTW_TSAN "${tests[@]}" "${info_tests[@]}"; then
    rm -rf build-tsan/sanitizer-logs
    if [ -n "$TSAN_DEPS_LIB" ]; then
      # Every gRPC / abseil library must resolve to the instrumented copies, or the run is not
      # what it claims to be.
      stray=$(LD_LIBRARY_PATH="$TSAN_DEPS_LIB" ldd build-tsan/server_test build-tsan/vtw-server |
              awk -v d="$TSAN_DEPS_LIB" '/(libgrpc|libgpr|libupb|libaddress_sorting|libabsl)/ && index($3, d) != 1 {print $1}' | sort -u)
      if [ -n "$stray" ]; then
        echo "[sanitize] tsan: these still load from the system, not $TSAN_DEPS_LIB: $stray" >&2
        exit 2
      fi
      echo "[sanitize] tsan: gRPC and abseil from $TSAN_DEPS_LIB (instrumented); the gRPC tests gate" >&2
      summary+=("tsan  mode: instrumented gRPC + abseil from $TSAN_DEPS_LIB, suppressions $TSAN_SUPP_FILE")
    else
      echo "[sanitize] tsan: system gRPC (not instrumented; scripts/build-tsan-deps.sh builds instrumented copies): the gRPC tests are informational" >&2
      summary+=("tsan  mode: system gRPC (uninstrumented), suppressions $TSAN_SUPP_FILE")
    fi
    run_tests tsan build-tsan 1 "${tests[@]}"
    [ ${#info_tests[@]} -gt 0 ] && run_tests tsan-info build-tsan "${SANITIZE_TSAN_STRICT:-0}" "${info_tests[@]}"
  else
    summary+=("tsan  BUILD FAILED"); failed=1
  fi
fi

echo "[sanitize] summary (total ${SECONDS}s):"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "[sanitize] FAILED: a test failed or a sanitizer reported something (see above)"
  exit 1
fi
echo "[sanitize] OK: no gating test failed and no gating sanitizer report (the tsan-info lines are informational)"
