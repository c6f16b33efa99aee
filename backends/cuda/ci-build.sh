#!/usr/bin/env bash
# Compile the CUDA backend for CI, which has nvcc but no GPU: it keeps the
# plugin from rotting (the GPU tests run on a GPU machine, benchmarks/device.sh).
#  1. `pip wheel ./backends/cuda` with build isolation, as a newcomer types it,
#     every kernel compiled to sm_90a's PTX (sm_90a's pass compiles every
#     kernel; sm_80's differs in a few guarded lines: no wgmma, scalar
#     red.add), and the host-only layout and schedule checks run.
#  2. ptxas (sm_90a, reporting) over that PTX, all but the bf16 kernels' (the
#     fp16 ones' templates over the other type; ptxas on them was ~150 s of
#     CI's 20 minutes). A kernel whose wgmmas ptxas serializes (C7510-C7515,
#     for any reason: one wgmma in flight, the tensor cores idle while the
#     warps dequantize; kernel notes v17-v18, v47) fails the build. Every
#     kernel's SASS, for both targets, comes from the wheels the GPU
#     machine's runs build (benchmarks/build_wheels.sh, device.sh).
#  3. The two ways CMake finds the core's headers, each configured and its
#     host sources (those that include plugin.h) compiled: the installed
#     core's CMake package, as a third-party plugin builds; and this source
#     tree's, where no Python says where an installed core is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

t0=$(date +%s)
mkdir -p "$build/ptx"
python3 -m pip wheel -v --no-deps -w "$build/wheel" "$here" \
  --config-settings=build-dir="$build/cmake" \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90a-virtual \
  --config-settings=cmake.define.FERRUM_MOE_CUDA_BUILD_TESTS=ON \
  "--config-settings=cmake.define.CMAKE_CUDA_FLAGS=--keep --keep-dir $build/ptx" >"$build/build.log" 2>&1 ||
  { tail -50 "$build/build.log"; exit 1; }
t1=$(date +%s)
ptx=$(ls "$build"/ptx/*.ptx | grep -v '/gemm_bf16\.ptx$')
[ "$(echo "$ptx" | wc -l)" -ge 5 ] || { echo "ci-build: expected the kernels' PTX in $build/ptx, found: $ptx" >&2; exit 1; }
echo "$ptx" | xargs -P "$CMAKE_BUILD_PARALLEL_LEVEL" -I{} sh -c 'ptxas -arch=sm_90a -O3 -v "$1" -o "$1.cubin" >"$1.log" 2>&1 || { cat "$1.log"; exit 1; }' _ {}
cat "$build"/ptx/*.ptx.log >"$build/ptxas.log"
serialized="wgmma.mma_async instructions are serialized"
if grep -q "$serialized" "$build/ptxas.log"; then
  echo "ptxas serializes the wgmmas of these kernels:" >&2
  grep "$serialized" "$build/ptxas.log" | sed 's/.*Loss: //' | sort -u >&2
  exit 1
fi
entries=$(grep -c "Compiling entry function" "$build/ptxas.log")
echo "ci-build: wheel (every kernel to sm_90a PTX): $((t1 - t0)) s; ptxas over $(echo "$ptx" | xargs -n1 basename | tr '\n' ' ')($entries kernels): $(( $(date +%s) - t1 )) s, no wgmma serialized"
ctest --test-dir "$build/cmake" --output-on-failure
ls "$build/wheel"/ferrum_moe_cuda-*.whl

tree_headers="building against the source tree's headers"
host_sources() {  # name, whose headers it must find, cmake arguments...
  local name=$1 expected=$2
  shift 2
  cmake -S "$here" -B "$build/$name" -DCMAKE_BUILD_TYPE=Release "$@" >"$build/$name.log" 2>&1 ||
    { tail -30 "$build/$name.log"; exit 1; }
  if grep -q "$tree_headers" "$build/$name.log"; then found="the tree's"; else found="the installed core's"; fi
  [ "$found" = "$expected" ] || { echo "ci-build: $name: $found headers were found" >&2; exit 1; }
  cmake --build "$build/$name" --target csrc/backend.cpp.o csrc/stack.cpp.o >>"$build/$name.log" 2>&1 ||
    { tail -30 "$build/$name.log"; exit 1; }
  echo "ci-build: $name: configured and its host sources compiled against $found headers"
}
host_sources installed "the installed core's" -Dferrum_moe_DIR="$(python3 -c 'import ferrum_moe; print(ferrum_moe.get_cmake_dir())')"
# No Python to ask where an installed core is: the tree's headers serve.
host_sources tree "the tree's" -DCMAKE_DISABLE_FIND_PACKAGE_Python=ON
