#!/usr/bin/env bash
# The oldest versions pyproject.toml promises, tested: the package built for the
# oldest Python it names (requires-python) with every dependency at its lower
# bound, then the test suite (without PyTorch, which has no local wheel for that
# Python: the tests that need it skip). pyproject's bounds come from such runs
# (docs/architecture.md, "DLPack").
#   bash scripts/oldest.sh [pytest arguments]
# Everything goes to build/oldest (git-ignored). The interpreter is PYTHON_OLDEST,
# else python3.10 on the PATH or pyenv's; without one it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/oldest
python=
for candidate in ${PYTHON_OLDEST:-} python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python3.10; do
  # (a pyenv shim is on the PATH whether or not it can run that version)
  if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 10)" 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "oldest: no Python 3.10 here (PYTHON_OLDEST): skipped"
  exit 0
fi
# The lower bounds, read from pyproject.toml's dependencies ("name>=x.y" -> "name==x.y.*").
pins=$("$python" - <<'EOF'
import re
text = open("pyproject.toml").read()
deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M).group(1)
print(" ".join(f"{name}=={low}.*" if low.count(".") < 2 else f"{name}=={low}"
               for name, low in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps)))
EOF
)
t0=$(date +%s)
rm -rf "$out/venv"
"$python" -m venv "$out/venv"
"$out/venv/bin/pip" install -q --upgrade pip
"$out/venv/bin/pip" install -q $pins "pytest>=7" "hypothesis>=6.100"
# Kernels at -O1 (CMakeLists.txt, FERRUM_MOE_KERNEL_OPTIONS): what this run checks is the Python
# side's versions, and the -O3 kernels compile for minutes.
"$out/venv/bin/pip" install -q -C build-dir="$out/build" -C cmake.define.FERRUM_MOE_KERNEL_OPTIONS=-O1 .
"$out/venv/bin/python" -c "import sys, numpy, ml_dtypes, safetensors, tqdm; print('oldest:', sys.version.split()[0],
  'numpy', numpy.__version__, 'ml_dtypes', ml_dtypes.__version__, 'safetensors', safetensors.__version__,
  'tqdm', tqdm.__version__)"
status=0
"$out/venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
echo "oldest: $(( $(date +%s) - t0 )) s, exit status $status"
exit $status
