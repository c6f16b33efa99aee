#!/usr/bin/env bash
# Compile the CUDA backend for CI, which has nvcc but no GPU: it keeps the
# plugin from rotting (the GPU tests run on a GPU machine, benchmarks/device.sh).
#  1. against the installed ferrum-moe core, as a third-party plugin builds,
#     with the host-only layout check, ptxas reporting: a kernel whose wgmmas
#     ptxas serializes (C7510-C7515, for any reason: one wgmma in flight, the
#     tensor cores idle while the warps dequantize; kernel notes v17-v18, v47)
#     fails the build;
#  2. as a newcomer types it: `pip wheel ./backends/cuda` with build isolation,
#     where the installed core is out of sight and the tree's headers serve
#     (for sm_80 alone: this checks the build's path, step 1 compiled every
#     kernel for both targets, and CI has 20 minutes).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cmake -S "$here" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DFERRUM_MOE_CUDA_BUILD_TESTS=ON \
  -DCMAKE_CUDA_FLAGS="-Xptxas=-v" \
  -Dferrum_moe_DIR="$(python3 -c 'import ferrum_moe; print(ferrum_moe.get_cmake_dir())')" >/dev/null
cmake --build "$build/cmake" -j 2 >"$build/build.log" 2>&1 || { tail -50 "$build/build.log"; exit 1; }
serialized="wgmma.mma_async instructions are serialized"
if grep -q "$serialized" "$build/build.log"; then
  echo "ptxas serializes the wgmmas of these kernels:" >&2
  grep "$serialized" "$build/build.log" | sed 's/.*Loss: //' | sort -u >&2
  exit 1
fi
ctest --test-dir "$build/cmake" --output-on-failure
python3 -m pip wheel -q --no-deps -w "$build/wheel" "$here" \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=80-real
ls "$build/wheel"/ferrum_moe_cuda-*.whl
