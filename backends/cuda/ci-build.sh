#!/usr/bin/env bash
# Compile the CUDA backend against the installed ferrum-moe core, and run its
# host-only layout check. For CI, which has nvcc but no GPU: it keeps the plugin
# from rotting; the GPU tests run on a GPU machine (benchmarks/device.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DFERRUM_MOE_CUDA_BUILD_TESTS=ON \
  -Dferrum_moe_DIR="$(python3 -c 'import ferrum_moe; print(ferrum_moe.get_cmake_dir())')" >/dev/null
cmake --build "$build" -j 2
ctest --test-dir "$build" --output-on-failure
