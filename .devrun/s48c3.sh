#!/usr/bin/env bash
# Session 48, third call: where the decode rows above vLLM spend their time (main = v81b):
# per-kernel times (profile_moe.py) and ncu sections of the two routed GEMMs, Mixtral M = 4
# and 32, Qwen3-30B-A3B M = 32. One tarball back.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/ferrum-out}
W=/tmp/work; mkdir -p "$W" "$FINAL"
export PYTHONUNBUFFERED=1
TOTAL=${TOTAL:-380}
start=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - start) )); }
rm -rf .dist && cp -r .dist-v81b .dist
OUT=$W/build bash benchmarks/device.sh build >"$W/build.log" 2>&1
i=0
for args in "--model mixtral --tokens 4" "--model qwen3-30b-a3b --tokens 32" "--model mixtral --tokens 32"; do
  [ "$(left)" -gt 60 ] || break
  (cd benchmarks && timeout 60 python3 profile_moe.py $args) >"$W/times-$i.txt" 2>&1
  (cd benchmarks && timeout $(( $(left) - 10 )) ncu -k "regex:gemv|gemm_routed" --launch-skip 6 --launch-count 2 \
     --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
     --section LaunchStats --section MemoryWorkloadAnalysis --print-details all python3 profile_moe.py $args) >"$W/ncu-$i.txt" 2>&1
  echo "[$(( $(date +%s) - start )) s] $args: rc=$?"
  grep -E "^== |kernels .* us|^  +[0-9.]+  x" "$W/times-$i.txt" | head -12
  grep -E "gemv_routed|gemm_routed_kernel|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Grid Size|Block Limit" "$W/ncu-$i.txt" | head -40
  i=$((i + 1))
done
(cd "$W" && tar czf "$FINAL/profile.tgz" times-* ncu-*)
