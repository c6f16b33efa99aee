#!/usr/bin/env bash
# Fails (exit 1) where ptxas's report (-v) in LOG says it serialized the wgmmas
# of a kernel (C7510-C7515, for any reason: one wgmma in flight, the tensor
# cores idle while the warps dequantize; kernel notes v17-v18, v47), naming
# the reasons; else exits 0. Used by ci-build.sh and benchmarks/build_wheels.sh.
#   bash backends/cuda/wgmma-serialized.sh LOG [WHAT]
set -euo pipefail
log=$1 what=${2:-these kernels}
serialized="wgmma.mma_async instructions are serialized"
if grep -q "$serialized" "$log"; then
  echo "ptxas serializes the wgmmas of $what:" >&2
  grep "$serialized" "$log" | sed 's/.*Loss: //' | sort -u >&2
  exit 1
fi
