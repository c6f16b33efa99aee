#!/usr/bin/env bash
# One call on the GPU machine: build the core and the CUDA plugin, run the tests,
# the sanitizers and the benchmarks, and print a short summary last.
#   bash benchmarks/device.sh [build | plugin] [test] [cpu] [sanitize] [hang] [bench] [linear] [align] [host] [steps]
#                             [profile] [source]
# (default: build test sanitize bench linear). plugin: install only the CUDA plugin (an A/B
# run of another .dist wheel on the core already installed); benchmarks/device_ab.sh runs a
# whole A/B of wheels built elsewhere that way, in both orders.
# PROFILE_ARGS picks the layers for ncu, STEPS_ARGS those for profile_moe.py --steps, SOURCE_ARGS
# those for the per-instruction samples of one routed GEMM (profile_moe.py's options, ';' between layers).
# host: bench_host.py, the host's cost of a call (CPU and CUDA), each step's issue time.
# cpu: the CPU kernel tests on the GPU machine's host CPU (a Xeon with AMX-BF16:
# the only place the AMX kernels run for real), then bench_cpu_isa.py: the AMX and
# AVX512-BF16 kernels beside oneDNN's bf16 matmul on 2 threads.
# sanitize: compute-sanitizer memcheck, racecheck and synccheck over cuda_smoke.py and the CUDA tests
# (SANITIZE_K: the pytest -k expression picking them; by default the model-shape sweep and the
# eight-thread layer test are left out, the latter deadlocks under racecheck: the hang stage).
# hang: the eight-thread layer workload under HANG_TOOL (racecheck), where it does not finish
# (docs/reliability.md); after HANG_AFTER seconds, cuda-gdb's host and device view of it.
# The CUDA plugin wheel is taken from .dist/ when one is there (built on a
# machine without a GPU: `pip wheel --no-build-isolation --no-deps ./backends/cuda -w .dist`),
# which saves the device the compile. Likewise the core from .dist-core/ (a wheel for the
# device's Python 3.12, built here: `python3.12 -m pip wheel --no-build-isolation --no-deps .
# -w .dist-core`; ~90 s of a cold call), built on the device where it does not import there.
# BENCH_ARGS / LINEAR_ARGS pass options on.
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/ferrum-out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ferrum-out}
mkdir -p "$OUT"
stages=${*:-build test sanitize bench linear}
SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-1800}  # seconds per tool and program (rc 124: it ran out)
summary=()
has() { [[ " $stages " == *" $1 "* ]]; }
now() { date +%s; }

if has build || has plugin; then
  t=$(now)
  rc=0
  core="core built"
  if has build; then
    if ls .dist-core/ferrum_moe-*.whl >/dev/null 2>&1 &&
       python3 -m pip install -q --no-deps --force-reinstall .dist-core/ferrum_moe-*.whl >"$OUT/build-core.log" 2>&1 &&
       python3 -c "import ferrum_moe._core" >>"$OUT/build-core.log" 2>&1; then
      core="core from .dist-core"
    else
      python3 -m pip install -q --no-build-isolation --no-deps . >>"$OUT/build-core.log" 2>&1 || rc=$?
    fi
  fi
  if ls .dist/ferrum_moe_cuda-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --force-reinstall .dist/ferrum_moe_cuda-*.whl >"$OUT/build-cuda.log" 2>&1 || rc=$?
    what="CUDA plugin from .dist"
  else
    python3 -m pip install -q --no-build-isolation --no-deps -v ./backends/cuda >"$OUT/build-cuda.log" 2>&1 || rc=$?
    what="CUDA plugin built"
  fi
  has build && what="$core, $what"
  summary+=("build: rc=$rc ($what) in $(( $(now) - t )) s")
  [ $rc -eq 0 ] || { tail -30 "$OUT"/build-*.log; }
  ferrum-moe info
fi

if has test; then
  t=$(now)
  python3 -m pytest -q -p no:cacheprovider tests/ -k "cuda" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -25
  summary+=("tests (cuda targets): $(tail -1 "$OUT/pytest-cuda.log") in $(( $(now) - t )) s")
fi

if has cpu; then
  t=$(now)
  python3 -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py 2>&1 | tee "$OUT/pytest-cpu.log" | tail -5
  summary+=("CPU kernel tests: $(tail -1 "$OUT/pytest-cpu.log") in $(( $(now) - t )) s; $(ferrum-moe info | grep -m1 '^  cpu' | sed 's/  */ /g')")
  python3 benchmarks/bench_cpu_isa.py --threads 2 --isas amx,avx512bf16 --json "$OUT/bench-cpu-isa.json" 2>&1 |
    tee "$OUT/bench-cpu-isa.log" | tail -9
fi

if has sanitize; then
  # memcheck, racecheck and synccheck over the smoke script and the CUDA tests
  # (tests/ -k cuda; the model-shape sweep left out: the same kernels at sizes the tools would
  # take hours over). The tests run in SANITIZE_SHARDS processes per tool, all
  # at once on the one GPU (the tools' cost is mostly host-side); JAX must not
  # preallocate most of the GPU in each of them.
  t=$(now)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  shards=${SANITIZE_SHARDS:-4}
  python3 -m pytest -q --collect-only -p no:cacheprovider tests/ -k "${SANITIZE_K:-cuda and not model_shapes and not 8_threads}" \
    | grep '::' >"$OUT/sanitize-tests.txt"
  san() {  # tool, log, program...
    local tool=$1 log=$2; shift 2
    timeout "$SANITIZE_TIMEOUT" compute-sanitizer --tool "$tool" --error-exitcode 9 "$@" >"$log" 2>&1
    echo "rc=$?" >>"$log"
  }
  for tool in memcheck racecheck synccheck; do
    # racecheck loses track of launches from several host threads (its "Internal Sanitizer
    # Error", counted as a hazard: docs/reliability.md); its races are within a CTA, so one
    # thread makes the same launches
    threads=4
    [ $tool = racecheck ] && threads=1
    san $tool "$OUT/san-$tool-smoke.log" python3 benchmarks/cuda_smoke.py --threads $threads &
    for ((i = 0; i < shards; i++)); do
      san $tool "$OUT/san-$tool-$i.log" python3 benchmarks/pytest_shard.py "$OUT/sanitize-tests.txt" "$shards" "$i" &
    done
  done
  wait
  for tool in memcheck racecheck synccheck; do
    cat "$OUT"/san-$tool-*.log >"$OUT/sanitize-$tool.log"
    rm -f "$OUT"/san-$tool-*.log
    summary+=("compute-sanitizer $tool: $(grep -E '^rc=' "$OUT/sanitize-$tool.log" | tr '\n' ' ')| $(grep -E 'SUMMARY' "$OUT/sanitize-$tool.log" | sed 's/=* *//' | sort | uniq -c | tr '\n' ' ')| $(grep -E '^=+ .*(passed|failed|error)' "$OUT/sanitize-$tool.log" | tr -d '=' | tr '\n' ' ')")
  done
  summary+=("sanitizers: $(wc -l <"$OUT/sanitize-tests.txt") tests in $shards shards per tool, $(( $(now) - t )) s in all")
  rm -f "$OUT/sanitize-tests.txt"
fi

if has hang; then
  t=$(now)
  compute-sanitizer --tool "${HANG_TOOL:-racecheck}" python3 benchmarks/cuda_smoke.py --threads-only --threads 8 \
    --calls 32 --copy-in-threads >"$OUT/hang.log" 2>&1 &
  tool_pid=$!
  sleep "${HANG_AFTER:-90}"
  pid=$(ps -eo pid,comm,args | awk '$2 ~ /^python/ && /cuda_smoke/ {print $1}' | tail -1)
  if kill -0 "$tool_pid" 2>/dev/null && [ -n "$pid" ]; then
    timeout 120 cuda-gdb -p "$pid" -batch -ex "set pagination off" -ex "info cuda kernels" \
      -ex "thread apply all bt 16" >"$OUT/hang-stacks.txt" 2>&1
    gdb_rc=$?
    summary+=("hang: running after ${HANG_AFTER:-90} s ($(grep -c 'call .* done' "$OUT/hang.log") threaded calls done); cuda-gdb rc=$gdb_rc, hang-stacks.txt")
    kill -9 "$pid" "$tool_pid" 2>/dev/null
  else
    wait "$tool_pid"
    summary+=("hang: finished, rc=$? in $(( $(now) - t )) s: $(tail -1 "$OUT/hang.log")")
  fi
fi

if has bench; then
  (cd benchmarks && python3 bench_moe.py ${BENCH_ARGS:-} --json "$OUT/bench-moe.json") 2>&1 | tee "$OUT/bench-moe.log" | grep -v "^|"
fi

if has steps; then
  # profile_moe.py --steps per STEPS_ARGS entry (';'-separated profile_moe.py options): each
  # step's share of the layer's graph replay (dependent launch on, as the benchmark runs it).
  IFS=';' read -ra layers <<<"${STEPS_ARGS:---model mixtral --tokens 1}"
  for args in "${layers[@]}"; do
    echo "== steps $args"
    (cd benchmarks && python3 profile_moe.py --steps $args 2>&1 | grep -E "^==|up to|without|pair-routed|graph replay") | tee -a "$OUT/steps.log"
  done
fi

if has profile; then
  # ncu over one layer call per PROFILE_ARGS entry (';'-separated profile_moe.py options, after
  # its warm-up calls): every kernel's duration with nothing overlapping (ncu serialises the
  # launches that programmatic dependent launch overlaps), then the two routed GEMMs' stall
  # reasons and the SASS lines they stall on (the tiles' or the decode GEMV's kernels).
  IFS=';' read -ra layers <<<"${PROFILE_ARGS:---model mixtral --tokens 1}"
  for i in "${!layers[@]}"; do
    (cd benchmarks && ncu -k "regex:gemv_routed|gemm_routed|gated_silu|moe_align|moe_sum" --launch-skip 10 --launch-count 5 --section SpeedOfLight \
        python3 profile_moe.py ${layers[i]}) >"$OUT/ncu-times-$i.txt" 2>&1
    (cd benchmarks && ncu -k "regex:gemv_routed|gemm_routed" --launch-skip 6 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section MemoryWorkloadAnalysis --section SourceCounters --print-details all \
        python3 profile_moe.py ${layers[i]}) >"$OUT/ncu-$i.txt" 2>&1
    summary+=("ncu ${layers[i]}: rc=$? (ncu-$i.txt, ncu-times-$i.txt)")
  done
fi

if has source; then
  # The first routed GEMM of one layer call per SOURCE_ARGS entry (';'-separated profile_moe.py
  # options; SOURCE_SKIP routed launches skipped first: the warm-up calls'), sampled per SASS
  # instruction: ncu's source page as CSV (gzipped) and ncu_source.py's summary of it (by
  # opcode, by producer / consumer role, the top instructions).
  IFS=';' read -ra layers <<<"${SOURCE_ARGS:---model mixtral --tokens 4096}"
  for i in "${!layers[@]}"; do
    (cd benchmarks && ncu -k regex:gemm_routed --launch-skip "${SOURCE_SKIP:-6}" --launch-count 1 \
        --section SourceCounters --section WarpStateStats -o "$OUT/source-$i" python3 profile_moe.py ${layers[i]}) \
      >"$OUT/source-$i.log" 2>&1
    ncu -i "$OUT/source-$i.ncu-rep" --page source --csv --print-source sass >"$OUT/source-$i.csv" 2>>"$OUT/source-$i.log" ||
      ncu -i "$OUT/source-$i.ncu-rep" --page source --csv >"$OUT/source-$i.csv" 2>>"$OUT/source-$i.log"
    python3 benchmarks/ncu_source.py "$OUT/source-$i.csv" >"$OUT/source-$i.txt" 2>&1
    gzip -f "$OUT/source-$i.csv" && rm -f "$OUT/source-$i.ncu-rep"
    summary+=("source ${layers[i]}: $(head -1 "$OUT/source-$i.txt") (source-$i.txt, source-$i.csv.gz)")
  done
fi

if has align; then
  (cd benchmarks && python3 bench_align.py --json "$OUT/bench-align.json") 2>&1 | tee "$OUT/bench-align.log" | grep -v "^|"
fi

if has host; then
  python3 benchmarks/bench_host.py 2>&1 | tee "$OUT/bench-host.log" | grep -v "^|"
fi

if has linear; then
  (cd benchmarks && python3 bench_linear.py ${LINEAR_ARGS:-} --json "$OUT/bench-linear.json") 2>&1 | tee "$OUT/bench-linear.log" | grep -v "^|"
fi

echo
echo "== summary =="
printf '%s\n' "${summary[@]}"
for f in "$OUT"/bench-moe.log "$OUT"/bench-linear.log "$OUT"/bench-align.log "$OUT"/bench-host.log; do
  [ -f "$f" ] && grep "^|" "$f"
done
