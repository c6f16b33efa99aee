#!/usr/bin/env bash
# Compile the CUDA backend for CI, which has nvcc but no GPU: it keeps the
# plugin from rotting (the GPU tests run on a GPU machine, benchmarks/device.sh).
#  1. `pip wheel ./backends/cuda` with build isolation, as a newcomer types it,
#     every kernel compiled to sm_90a's PTX (sm_90a's pass compiles every
#     kernel; sm_80's differs in a few guarded lines: no wgmma, scalar
#     red.add), and the host-only layout and schedule checks run.
#  2. ptxas (sm_90a, reporting) over that PTX, all but the bf16 kernels' (the
#     fp16 ones' templates over the other type; ptxas on them was ~150 s of
#     CI's 20 minutes). A kernel whose wgmmas ptxas serializes fails the
#     build (wgmma-serialized.sh). Every kernel's SASS, for both targets,
#     comes from the wheels the GPU machine's runs build
#     (benchmarks/build_wheels.sh, device.sh).
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
# The PTX of every source file but gemm_bf16.cu, each checked to be there.
ptx=()
for source in "$here"/csrc/*.cu; do
  name=$(basename "$source" .cu)
  [ "$name" = gemm_bf16 ] && continue
  [ -f "$build/ptx/$name.ptx" ] || { echo "ci-build: no PTX of $name.cu in $build/ptx" >&2; exit 1; }
  ptx+=("$build/ptx/$name.ptx")
done
printf '%s\n' "${ptx[@]}" |
  xargs -P "$CMAKE_BUILD_PARALLEL_LEVEL" -I{} sh -c 'ptxas -arch=sm_90a -O3 -v "$1" -o "$1.cubin" >"$1.log" 2>&1 || { cat "$1.log"; exit 1; }' _ {}
cat "${ptx[@]/%/.log}" >"$build/ptxas.log"
bash "$here/wgmma-serialized.sh" "$build/ptxas.log"
entries=$(grep -c "Compiling entry function" "$build/ptxas.log")
echo "ci-build: wheel (every kernel to sm_90a PTX): $((t1 - t0)) s; ptxas over ${#ptx[@]} files' $entries kernels: $(( $(date +%s) - t1 )) s, no wgmma serialized"
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
