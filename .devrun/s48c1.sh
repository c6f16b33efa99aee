#!/usr/bin/env bash
# Session 48, first call: v81 (else v80) CUDA suite + memcheck subset; A/B main / v80 / v81
# on plain M = 1, 256, 1024 (four layers) and act-order M = 1, 2, 4 (both orders); then the
# passing candidate's full sweep layer by layer while TOTAL seconds allow.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/ferrum-out} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"
TOTAL=${TOTAL:-560}
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

cand=v81
rm -rf .dist && cp -r .dist-v81 .dist
OUT=$OUT/test-v81 bash benchmarks/device.sh build test >"$OUT/test-v81.log" 2>&1
say "v81 build/test: $(grep -E '^build|^tests' "$OUT/test-v81.log" | tr '\n' ' ')"
grep -E "^FAILED|^ERROR" "$OUT/test-v81/pytest-cuda.log" | head -20 | tee -a "$OUT/summary.txt"
if ! tail -1 "$OUT/test-v81/pytest-cuda.log" | grep -q " passed" || tail -1 "$OUT/test-v81/pytest-cuda.log" | grep -qE "failed|error"; then
  cand=v80
  rm -rf .dist && cp -r .dist-v80 .dist
  OUT=$OUT/test-v80 bash benchmarks/device.sh plugin test >"$OUT/test-v80.log" 2>&1
  say "v80 test: $(grep -E '^tests' "$OUT/test-v80.log" | tr '\n' ' ')"
  grep -E "^FAILED|^ERROR" "$OUT/test-v80/pytest-cuda.log" | head -20 | tee -a "$OUT/summary.txt"
fi

# memcheck on the candidate over the tests its change touches (4 shards at once)
python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_cuda.py \
  -k "act_order or mid_m or few_prefill or stream_k or gated or decode_gemv or pair_routing" | grep '::' >"$OUT/mc-ids.txt"
for i in 0 1 2 3; do
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/pytest_shard.py "$OUT/mc-ids.txt" 4 $i >"$OUT/mc-$i.log" 2>&1 &
done
wait
say "memcheck ($cand, $(wc -l <"$OUT/mc-ids.txt") tests): $(grep -hE 'ERROR SUMMARY' "$OUT"/mc-*.log | sort | uniq -c | tr '\n' ' ')| $(grep -hE '^=+ .*(passed|failed)' "$OUT"/mc-*.log | tr -d '=' | tr '\n' ' ')"

export AB_CORE=plugin
BENCH_ARGS="--tokens 1,256,1024 --big-tokens none --repeats 20 --models mixtral,qwen3-30b-a3b,deepseek-v2-lite,deepseek-v3" \
  OUT=$OUT/ab-plain bash benchmarks/device_ab.sh main=.dist-main v80=.dist-v80 v81=.dist-v81 >"$OUT/ab-plain.log" 2>&1
say "A/B plain done"
BENCH_ARGS="--tokens 1,2,4 --big-tokens none --repeats 20 --act-order --models qwen3-30b-a3b,mixtral" \
  OUT=$OUT/ab-act bash benchmarks/device_ab.sh main=.dist-main v80=.dist-v80 v81=.dist-v81 >"$OUT/ab-act.log" 2>&1
say "A/B act-order done"

rm -rf .dist && cp -r ".dist-$cand" .dist && OUT=$OUT/sweep bash benchmarks/device.sh plugin >/dev/null 2>&1
for model in qwen3-30b-a3b deepseek-v2-lite mixtral deepseek-v3; do
  [ "$(left)" -gt 100 ] || { say "sweep: $model skipped ($(left) s left)"; continue; }
  (cd benchmarks && timeout $(( $(left) - 20 )) python3 bench_moe.py --models $model --json "$OUT/sweep-$model.json") \
    >"$OUT/sweep-$model.log" 2>&1
  say "sweep $model ($cand): rc=$?"
done
echo; echo "== A/B plain =="; sed -n '/^|/,$p' "$OUT/ab-plain.log" | tail -40
echo; echo "== A/B act-order =="; sed -n '/^|/,$p' "$OUT/ab-act.log" | tail -16
echo; echo "== summary =="; cat "$OUT/summary.txt"
