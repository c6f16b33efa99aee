#!/usr/bin/env bash
# Session 48, second call: v81b's CUDA suite; A/B main / v81b on act-order M = 1, 2, 4 (three
# layers) and plain M = 1, 1024 (two); then v81b's full sweep layer by layer while TOTAL allows.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/ferrum-out}
export OUT=/tmp/work PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT" "$FINAL"
TOTAL=${TOTAL:-560}
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rm -rf .dist && cp -r .dist-v81b .dist
OUT=$OUT/test-v81b bash benchmarks/device.sh build test >"$OUT/test-v81b.log" 2>&1
say "v81b build/test: $(grep -E '^build|^tests' "$OUT/test-v81b.log" | tr '\n' ' ')"
grep -E "^FAILED|^ERROR" "$OUT/test-v81b/pytest-cuda.log" | head -20 | tee -a "$OUT/summary.txt"
export AB_CORE=plugin
BENCH_ARGS="--tokens 1,2,4 --big-tokens none --repeats 20 --act-order --models qwen3-30b-a3b,deepseek-v2-lite,mixtral" \
  OUT=$OUT/ab-act bash benchmarks/device_ab.sh main=.dist-main v81b=.dist-v81b >"$OUT/ab-act.log" 2>&1
say "A/B act-order done"
BENCH_ARGS="--tokens 1,1024 --big-tokens none --repeats 20 --models qwen3-30b-a3b,deepseek-v3" \
  OUT=$OUT/ab-plain bash benchmarks/device_ab.sh main=.dist-main v81b=.dist-v81b >"$OUT/ab-plain.log" 2>&1
say "A/B plain done"
rm -rf .dist && cp -r .dist-v81b .dist && OUT=$OUT/sweep bash benchmarks/device.sh plugin >/dev/null 2>&1
for model in qwen3-30b-a3b deepseek-v2-lite mixtral deepseek-v3; do
  [ "$(left)" -gt 60 ] || { say "sweep: $model skipped ($(left) s left)"; continue; }
  (cd benchmarks && timeout $(( $(left) - 15 )) python3 bench_moe.py --models $model --repeats 10 --json "$OUT/sweep-$model.json") \
    >"$OUT/sweep-$model.log" 2>&1
  say "sweep $model (v81b): rc=$?"
done
echo; echo "== A/B act-order =="; sed -n '/^|/,$p' "$OUT/ab-act.log" | tail -16
echo; echo "== A/B plain =="; sed -n '/^|/,$p' "$OUT/ab-plain.log" | tail -10
echo; echo "== summary =="; cat "$OUT/summary.txt"
cp "$OUT/summary.txt" "$OUT/ab-act.log" "$OUT/ab-plain.log" "$FINAL/"
tail -30 "$OUT/test-v81b/pytest-cuda.log" >"$FINAL/pytest-tail.txt"
(cd "$OUT" && tar czf "$FINAL/results.tgz" --exclude='build-*.log' .)
