#!/usr/bin/env bash
# Builds wheels on a machine without a GPU for one device call (benchmarks/device.sh and
# device_ab.sh install them instead of compiling there): the core of this checkout into
# .dist-core (for the device's Python, PYTHON), and the CUDA plugin of each named revision into
# .dist-LABEL, each from a detached worktree of that revision. The .dist-* folders are ignored
# by git: pass them to the device call's carry. One build at a time (a plugin: ~4 min on two
# cores).
#   bash benchmarks/build_wheels.sh [--core] LABEL=REV [LABEL=REV ...]
#   e.g. bash benchmarks/build_wheels.sh --core main=main new=HEAD s35=ba8235f
# CUDA_FLAGS adds nvcc options to the plugins' builds (e.g. CUDA_FLAGS=--split-compile=0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.12}
root=$(pwd)
"$PYTHON" -c "" 2>/dev/null || { echo "build_wheels: '$PYTHON' does not run (PYTHON= names the device's Python)" >&2; exit 2; }
if [ "${1:-}" = "--core" ]; then
  shift
  rm -rf .dist-core
  "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps . -w .dist-core
  echo "core: $(ls .dist-core)"
fi
for arg in "$@"; do
  label=${arg%%=*} rev=${arg#*=}
  [ -n "$label" ] && [ "$label" != "$arg" ] || { echo "build_wheels: expected LABEL=REV, got '$arg'" >&2; exit 2; }
  commit=$(git rev-parse --verify "$rev^{commit}")
  tree=$(mktemp -d /tmp/ferrum-wheel-XXXXXX)
  git worktree add -q --detach "$tree" "$commit"
  rm -rf ".dist-$label"
  # ptxas reporting: a kernel whose wgmmas it serializes fails here, for either
  # target and type (CI's build checks the fp16 kernels on sm_90a: ci-build.sh).
  (cd "$tree" && "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps ./backends/cuda -w "$root/.dist-$label" \
     "--config-settings=cmake.define.CMAKE_CUDA_FLAGS=-Xptxas=-v ${CUDA_FLAGS:-}" >"$tree/build.log" 2>&1) ||
    { tail -40 "$tree/build.log"; exit 1; }
  bash backends/cuda/wgmma-serialized.sh "$tree/build.log" "$label's kernels" || { rm -rf ".dist-$label"; exit 1; }
  git worktree remove --force "$tree"
  echo "$label: $(git log --oneline -1 "$commit" | cut -c1-60) -> $(ls ".dist-$label")"
done
