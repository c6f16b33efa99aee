#!/usr/bin/env bash
# One call on the GPU machine: build the core and the CUDA plugin, run the tests,
# the sanitizers and the benchmark, and print a short summary last.
#   bash benchmarks/device.sh [build] [test] [sanitize] [bench]   (default: all)
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/ferrum-out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ferrum-out}
mkdir -p "$OUT"
stages=${*:-build test sanitize bench}
summary=()
has() { [[ " $stages " == *" $1 "* ]]; }
now() { date +%s; }

if has build; then
  t=$(now)
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build-core.log" 2>&1 \
    && python3 -m pip install -q --no-build-isolation --no-deps -v ./backends/cuda >"$OUT/build-cuda.log" 2>&1
  rc=$?
  summary+=("build: rc=$rc in $(( $(now) - t )) s")
  [ $rc -eq 0 ] || { tail -30 "$OUT/build-core.log" "$OUT/build-cuda.log"; }
  ferrum-moe info
fi

if has test; then
  t=$(now)
  python3 -m pytest -q -p no:cacheprovider tests/ -k "cuda" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -25
  summary+=("tests (cuda targets): $(tail -1 "$OUT/pytest-cuda.log") in $(( $(now) - t )) s")
fi

if has sanitize; then
  for tool in memcheck racecheck; do
    t=$(now)
    compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/cuda_smoke.py >"$OUT/sanitize-$tool.log" 2>&1
    rc=$?
    summary+=("compute-sanitizer $tool: rc=$rc, $(grep 'SUMMARY' "$OUT/sanitize-$tool.log" | sed 's/=* *//') in $(( $(now) - t )) s")
    tail -3 "$OUT/sanitize-$tool.log"
  done
fi

if has bench; then
  python3 benchmarks/bench_moe.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30
fi

echo
echo "== summary =="
printf '%s\n' "${summary[@]}"
