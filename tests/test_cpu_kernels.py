"""The CPU backend's kernels against float64, on every kernel set this machine
runs: the in-process tests use the set the backend picked; test_every_isa
re-runs this module in a subprocess per other set (FERRUM_MOE_CPU_ISA),
since the backend chooses once per process.

Shapes are picked to reach every path: the stream kernels (few rows, in row
chunks) and the tile kernels (many rows, in micro-kernel blocks and item
row blocks), partial column blocks and windows, partial groups, K not a
multiple of 8, groups of any size (a size not a multiple of 8 reorders K),
act-order, a g_idx that only restates k // group_size, and units cut from
one long group. With a float32 output nothing rounds the result but the
kernel's float32 accumulation, so every element is held to a tight bound
scaled by sum_k |x_k| |w_kn|."""

import json
import os
import platform
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import ferrum_moe as fm

from conftest import NUMPY_DTYPES, REL_TOL, as64, poisoned, random_activations, random_weight, reference_moe, rel_error

ISAS = ["amx", "avx512bf16", "avx512", "avx2", "generic"]
CHILD = "FERRUM_MOE_TEST_ISA_CHILD"

FORMATS = [  # bits, group_size, sym, act_order, natural g_idx
    (4, 128, True, False, False),
    (4, 32, False, False, False),
    (4, 64, True, True, False),
    (4, -1, False, False, False),
    (4, 20, True, False, False),   # groups not a multiple of 8 rows: K reordered with padding
    (4, 32, True, False, True),    # g_idx == k // 32: the natural order
    (8, 128, True, False, False),
    (8, 32, False, True, False),
]

# Rows reaching the stream kernels (1-4 and chunks of them) and the tile
# kernels (micro-kernel remainders, two item row blocks).
ROWS = [1, 3, 6, 17, 40, 100]

# Bound on |out - ref| / (|x| @ |W|) for a float32 output: float32 accumulation
# over units of 128 rows (the bf16 kernels add 128 to every code and take it
# out per unit, hence their looser bound).
ACCUMULATION_TOL = {"float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-4}


def _cpu():
    (cpu,) = [b for b in fm.backends() if b.name == "cpu"]
    return cpu


def _weights(rng, k, n, bits, group_size, sym, act_order, natural, dtype, e=2):
    if natural:
        g_idx = (np.arange(k) // group_size).astype(np.int32)
        return [fm.gptq.quantize(rng.standard_normal((k, n)) / np.sqrt(k), bits, group_size, sym, g_idx=g_idx,
                                 scale_dtype=NUMPY_DTYPES[dtype]) for _ in range(e)]
    return [random_weight(rng, k, n, bits=bits, group_size=group_size, sym=sym, act_order=act_order, dtype=dtype)
            for _ in range(e)]


def _check_elements(got, x, w, dtype, what):
    dense = w.dequantize(np.float64)
    ref = as64(x) @ dense
    bound = np.abs(as64(x)) @ np.abs(dense)
    got = as64(got)
    assert np.all(np.isfinite(got)), f"{what}: unwritten (NaN) elements"
    worst = float(np.max(np.abs(got - ref) / np.maximum(bound, 1e-30)))
    assert worst < ACCUMULATION_TOL[dtype], f"{what}: error {worst:.2e} of sum |x||w| > {ACCUMULATION_TOL[dtype]:.0e}"


@pytest.mark.parametrize("bits, group_size, sym, act_order, natural", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gemm_every_path_matches_float64(rng, dtype, bits, group_size, sym, act_order, natural):
    k, n = 300, 200  # K: a partial group for every size, not a multiple of 8; N: a partial 64-column block
    weights = _weights(rng, k, n, bits, group_size, sym, act_order, natural, dtype)
    stack = fm.ExpertStack.from_gptq(weights, dtype=dtype)
    for m in ROWS:
        x = random_activations(rng, (m, k), dtype)
        out = poisoned((m + 2, n), "float32")
        stack.gemm_batched(x, [[1, 0, 2, m]], out=out)
        assert np.all(np.isnan(out[:2])), "rows no dispatch names must stay untouched"
        _check_elements(out[2:], x, weights[1], dtype, f"M={m}, float32 out")
        if m not in (3, 40):
            continue
        # The stack's own dtype: rounded once at the end.
        out16 = poisoned((m, n), dtype)
        stack.gemm_batched(x, [[0, 0, 0, m]], out=out16)
        assert rel_error(out16, as64(x) @ weights[0].dequantize(np.float64)) < REL_TOL[dtype], f"M={m}, {dtype} out"


@pytest.mark.parametrize("m", [2, 40])
@pytest.mark.parametrize("offset, width", [(16, 160), (64, 136), (192, 8), (0, 16)])
def test_windows_inside_and_across_column_blocks(rng, m, offset, width):
    dtype = "bfloat16"
    k, n = 136, 200
    w = random_weight(rng, k, n, group_size=32, sym=False, dtype=dtype)
    stack = fm.ExpertStack.from_gptq([w], dtype=dtype)
    bias = random_activations(rng, (width,), dtype)
    lin = stack.expert_linear(offset, width, bias=bias)
    x = random_activations(rng, (m, k), dtype)
    out = poisoned((m, width), "float32")
    lin(x, out=out)
    ref = as64(x) @ w.dequantize(np.float64)[:, offset:offset + width] + as64(bias)
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out - ref)) < 1e-3 * np.max(np.abs(ref))


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_routed_layers_across_many_experts(rng, dtype, m):
    """Many experts with few rows each (the stream kernels, all in one call)
    and a few with many (the tile kernels), router weights on the rows."""
    e, hidden, inter, top_k = 16, 200, 100, 4  # widths past the last 16 lanes: the elementwise steps' tails
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=64, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=32, sym=False, dtype=dtype) for _ in range(e)]
    s13, s2 = fm.ExpertStack.from_gptq(w13, dtype=dtype), fm.ExpertStack.from_gptq(w2, dtype=dtype)
    x = random_activations(rng, (m, hidden), dtype)
    ids = np.stack([rng.permutation(e)[:top_k] for _ in range(m)]).astype(np.int32)
    if m == 64:
        ids[:40, 0] = 3  # one expert with 40 rows: the tile kernel
    tw = rng.random((m, top_k)).astype(np.float32)
    out = poisoned((m, hidden), dtype)
    fm.fused_moe(x, s13, s2, tw, ids, out=out)
    assert rel_error(out, reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_silu_and_mul_across_its_range(rng, dtype):
    """The vectorized e^x over the whole float range: saturation both ways,
    NaN kept, rows wider than the vector with a tail."""
    from ferrum_moe.arrays import import_array

    n = 100
    gate = rng.standard_normal((3, n)) * 4
    gate[0, :12] = [-1e30, -100, -88, -87, -20, -1e-30, 0, 1e-30, 20, 87, 100, 1e30]
    gate[1, 5] = np.nan
    with np.errstate(over="ignore"):
        x = np.concatenate([gate, rng.standard_normal((3, n))], axis=1).astype(NUMPY_DTYPES[dtype])
    out = poisoned((3, n), dtype)
    backend = fm.ExpertStack.from_gptq([random_weight(rng, 32, 16, group_size=32)], dtype="float16")._core.backend
    backend.gated_activation(import_array(x, "x"), import_array(out, "out"), 0)
    g, u = as64(x[:, :n]), as64(x[:, n:])  # 1e30 is infinite in float16: so is its result
    with np.errstate(all="ignore"):
        ref = g / (1 + np.exp(-g)) * u
    got = as64(out)
    assert np.isnan(got[1, 5]) and np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    ok = np.isfinite(ref)
    # Relative: e^x's 3e-7 or the output's rounding. Absolute: float16's subnormal
    # spacing; for float32 and bfloat16 the smallest normal, as a result below it
    # (silu of g < -88.7) may come out zero.
    rtol, atol = {"float32": (1e-6, 2.0 ** -126), "float16": (2 ** -10, 2.0 ** -24), "bfloat16": (2 ** -7, 2.0 ** -126)}[dtype]
    assert np.all(np.abs(got[ok] - ref[ok]) <= rtol * np.abs(ref[ok]) + atol)


PARENT_ONLY = pytest.mark.skipif(os.environ.get(CHILD) == "1", reason="independent of the kernel set: parent only")


@PARENT_ONLY
def test_calls_from_several_threads_at_once(rng):
    """The GIL is released during compute and the backend runs one call's
    parallel region at a time: concurrent callers all get their own results."""
    dtype = "bfloat16"
    weights = [random_weight(rng, 256, 192, group_size=64, dtype=dtype) for _ in range(3)]
    stack = fm.ExpertStack.from_gptq(weights, dtype=dtype)
    inputs = [random_activations(rng, (m, 256), dtype) for m in (1, 5, 33, 70)]
    refs = [as64(x) @ weights[i % 3].dequantize(np.float64) for i, x in enumerate(inputs)]
    errors = []

    def work(i):
        for _ in range(20):
            out = poisoned((inputs[i].shape[0], 192), "float32")
            stack.gemm_batched(inputs[i], [[i % 3, 0, 0, inputs[i].shape[0]]], out=out)
            errors.append(float(np.max(np.abs(out - refs[i])) / np.max(np.abs(refs[i]))))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and max(errors) < 1e-3


def _run_child(code, env_extra, tmp_path):
    env = dict(os.environ, **env_extra)
    script = tmp_path / "child.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)


@PARENT_ONLY
def test_results_do_not_depend_on_the_thread_count(rng, tmp_path):
    """Each work item runs on one thread in a fixed order, so one thread and
    every thread give the same bits; FERRUM_MOE_NUM_THREADS sets the count."""
    seed = int(rng.integers(1 << 31))
    code = f"""
import json, sys, numpy as np, ferrum_moe as fm
from ferrum_moe.testing import random_weight, random_activations
rng = np.random.default_rng({seed})
w = [random_weight(rng, 512, 320, group_size=128, dtype="bfloat16") for _ in range(2)]
s = fm.ExpertStack.from_gptq(w, dtype="bfloat16")
outs = [s.gemm_batched(random_activations(rng, (m, 512), "bfloat16"), [[1, 0, 0, m]]).view(np.uint16) for m in (1, 4, 50)]
np.savez(sys.argv[0] + ".npz", *outs)
print(json.dumps([b.description for b in fm.backends() if b.name == "cpu"]))
"""
    one = _run_child(code, {"FERRUM_MOE_NUM_THREADS": "1"}, tmp_path)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)[0].endswith("; 1 thread")
    first = dict(np.load(tmp_path / "child.py.npz"))
    two = _run_child(code, {"FERRUM_MOE_NUM_THREADS": "2"}, tmp_path)
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)[0].endswith("; 2 threads")
    second = dict(np.load(tmp_path / "child.py.npz"))
    assert all(np.array_equal(first[key], second[key]) for key in first)


@PARENT_ONLY
def test_bad_settings_make_the_backend_unavailable_with_the_reason(tmp_path):
    code = "import ferrum_moe as fm; print([b.error for b in fm.backends() if b.name == 'cpu'][0])"
    r = _run_child(code, {"FERRUM_MOE_CPU_ISA": "sse9"}, tmp_path)
    assert "FERRUM_MOE_CPU_ISA=sse9 is not a kernel set; expected one of amx, avx512bf16" in r.stdout
    r = _run_child(code, {"FERRUM_MOE_NUM_THREADS": "0"}, tmp_path)
    assert "FERRUM_MOE_NUM_THREADS=0: expected a thread count" in r.stdout


def test_the_description_names_the_kernels_in_use():
    cpu = _cpu()
    isa = cpu.description.split(":")[0]
    assert isa in ISAS
    if os.environ.get("FERRUM_MOE_CPU_ISA"):
        assert isa == os.environ["FERRUM_MOE_CPU_ISA"]
    assert ("vdpbf16ps" in cpu.description) == (isa in ("avx512bf16", "amx"))


@PARENT_ONLY
def test_the_amx_kernel_matches_avx512bf16_with_the_tiles_emulated(tmp_path):
    """The AMX tile kernel never runs on a machine without AMX; its addressing
    is checked by building it with the tile instructions written in C++
    (tests/native/amx_emulation.hpp) against the AVX512-BF16 kernel."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C++ compiler on x86-64")
    with open("/proc/cpuinfo") as f:
        if "avx512_bf16" not in f.read():
            pytest.skip("the check runs the AVX512-BF16 kernel beside the emulated AMX one")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cpu = os.path.join(root, "backends", "cpu")
    exe = str(tmp_path / "amx_check")
    subprocess.run([cxx, "-std=c++17", "-O1", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl",
                    "-mavx512bw", "-mavx512dq", "-mavx512bf16", "-I" + os.path.join(root, "src", "cpp", "include"),
                    "-I" + cpu, "-include", os.path.join(root, "tests", "native", "amx_emulation.hpp"),
                    os.path.join(cpu, "layout.cpp"), os.path.join(cpu, "kernels_avx512bf16.cpp"),
                    os.path.join(cpu, "kernels_amx.cpp"), os.path.join(root, "tests", "native", "amx_check.cpp"), "-o", exe],
                   check=True, capture_output=True, timeout=240)
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.endswith("ok\n"), r.stdout + r.stderr


@PARENT_ONLY
@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa, tmp_path):
    """This module again with FERRUM_MOE_CPU_ISA=isa, where this CPU runs it."""
    probe = _run_child("import ferrum_moe as fm; b = [b for b in fm.backends() if b.name == 'cpu'][0]; "
                       "print(b.available, b.error)", {"FERRUM_MOE_CPU_ISA": isa}, tmp_path)
    if "cannot run it" in probe.stdout:
        pytest.skip(f"this CPU has no {isa}: {probe.stdout.strip()}")
    assert probe.stdout.startswith("True"), probe.stdout + probe.stderr
    if _cpu().description.startswith(isa + ":"):
        pytest.skip(f"{isa} is the default here: the in-process tests ran it")
    env = dict(os.environ, FERRUM_MOE_CPU_ISA=isa, **{CHILD: "1"})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
