#!/usr/bin/env bash
# One A/B call on the GPU machine: CUDA plugin wheels built elsewhere (each in
# its own ignored .dist-* folder, carried along), the CUDA tests on the ones
# named in AB_TEST, then the MoE benchmark of every wheel in the order given
# and again in reverse (the machine drifts within a call: both orders keep a
# drift from reading as a difference), and compare_runs.py's table last.
#   bash benchmarks/device_ab.sh LABEL=DIR [LABEL=DIR ...]
#   e.g. AB_TEST="v29" bash benchmarks/device_ab.sh main=.dist-main v29=.dist-v29
# The first wheel is the base of the comparison. BENCH_ARGS as for device.sh
# (default: the 28 fp16 decode rows of the four layers). AB_STAGES: the device.sh
# stages run per wheel (default bench; e.g. "steps" with STEPS_ARGS, each wheel's
# launch chain step by step, or "linear" with LINEAR_ARGS: bench_linear.py's
# table compared as bench_moe.py's is). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ferrum-out}
mkdir -p "$OUT"
export BENCH_ARGS=${BENCH_ARGS:---tokens 1,2,4,8,16,32,64 --big-tokens none --models mixtral,qwen3-30b-a3b,deepseek-v2-lite,deepseek-v3}
[ $# -ge 2 ] || { echo "usage: device_ab.sh LABEL=DIR LABEL=DIR [...]" >&2; exit 2; }
labels=()
declare -A dirs
for arg in "$@"; do
  label=${arg%%=*} dir=${arg#*=}
  ls "$dir"/ferrum_moe_cuda-*.whl >/dev/null 2>&1 || { echo "device_ab: no wheel in $dir ($arg)" >&2; exit 2; }
  # each run copies its wheel to .dist: a wheel kept there would be deleted by the first copy
  [ "$(realpath "$dir")" != "$(realpath .dist 2>/dev/null)" ] || { echo "device_ab: $arg: keep the wheel in a .dist-* folder, not .dist" >&2; exit 2; }
  labels+=("$label")
  dirs[$label]=$dir
done
start=$(date +%s)
stage=${AB_CORE:-build}  # AB_CORE=plugin: the core is installed already (earlier in the call)
use() { rm -rf .dist && cp -r "${dirs[$1]}" .dist; }
run() {  # label, out folder, stages...
  local label=$1 out=$2
  shift 2
  use "$label"
  OUT=$out bash benchmarks/device.sh "$stage" "$@" >"$out.log" 2>&1
  stage=plugin  # the core is built once
  echo "$label ($(basename "$out")): $(grep -E '^tests|^build' "$out.log" | tr '\n' ' ')at $(( $(date +%s) - start )) s"
}
tests=()
for label in ${AB_TEST:-}; do
  run "$label" "$OUT/test-$label" test
  grep -E "^FAILED" "$OUT/test-$label/pytest-cuda.log" | head -20
  tests+=("$label: $(tail -1 "$OUT/test-$label/pytest-cuda.log")")
done
order=("${labels[@]}")
for ((i = ${#labels[@]} - 1; i >= 0; i--)); do order+=("${labels[i]}"); done
runs=()
declare -A seen
for label in "${order[@]}"; do
  name=$label
  [ -n "${seen[$label]:-}" ] && name="$label.2"
  seen[$label]=1
  run "$label" "$OUT/$name" ${AB_STAGES:-bench}
  runs+=("$name")
  [ -f "$OUT/$name/steps.log" ] && { echo "-- $name"; cat "$OUT/$name/steps.log"; }
done
find "$OUT" -name "build-*.log" -delete
for json in bench-moe.json bench-linear.json; do
  [ -f "$OUT/${labels[0]}/$json" ] || continue
  specs=()
  for name in "${runs[@]}"; do specs+=("$name=$OUT/$name/$json"); done
  echo
  python3 benchmarks/compare_runs.py "${specs[@]}"
done
# The tests' summaries again, last: a caller that keeps only the tail still has them.
if [ ${#tests[@]} -gt 0 ]; then printf 'CUDA tests, %s\n' "${tests[@]}"; fi
