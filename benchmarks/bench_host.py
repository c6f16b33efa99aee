"""The host's cost of a call through the Python API: warm calls of fm.MoE,
fm.fused_moe and fm.Linear on layers so small that the kernels take next to
nothing, numpy in and out on the CPU backend (and torch on CUDA where a GPU is
there, timed to a synchronize after the calls: the slower of issuing and running
them, at these sizes issuing).

    python benchmarks/bench_host.py [--calls 4000] [--repeats 5]

Prints the median over the repeats of the mean time per call, in microseconds, and the
pieces of one array's import (the import, the device context it enters, the producer's
__dlpack__), untimed by a synchronize.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import ferrum_moe as fm
from ferrum_moe.testing import random_weight

E, TOP_K, HIDDEN, INTER = 8, 2, 64, 64


def per_call_us(call, calls: int, repeats: int, synchronize=lambda: None) -> float:
    for _ in range(calls // 10):
        call()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def rows_for(backend: str, device: str, put, dtype: str, calls: int, repeats: int, synchronize):
    rng = np.random.default_rng(0)
    w13 = fm.ExpertStack.from_gptq([random_weight(rng, HIDDEN, 2 * INTER, group_size=32, dtype=dtype)
                                    for _ in range(E)], backend=backend, device=device, dtype=dtype)
    w2 = fm.ExpertStack.from_gptq([random_weight(rng, INTER, HIDDEN, group_size=32, dtype=dtype) for _ in range(E)],
                                  backend=backend, device=device, dtype=dtype)
    linear = fm.Linear.from_gptq(random_weight(rng, HIDDEN, HIDDEN, group_size=32, dtype=dtype), backend=backend,
                                 device=device, dtype=dtype)
    layer = fm.MoE(w13, w2, top_k=TOP_K)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    rows = []
    for m in (1, 4):
        x = put(rng.standard_normal((m, HIDDEN)).astype(np_dtype))
        ids = put(np.argsort(-rng.standard_normal((m, E)), axis=1)[:, :TOP_K].astype(np.int32))
        tw = put(rng.random((m, TOP_K)).astype(np.float32))
        out = put(np.empty((m, HIDDEN), np_dtype))
        rows.append((backend, "fm.MoE(out=)", m, per_call_us(lambda: layer(x, tw, ids, out=out), calls, repeats,
                                                             synchronize)))
        rows.append((backend, "fm.fused_moe", m, per_call_us(lambda: fm.fused_moe(x, w13, w2, tw, ids), calls, repeats,
                                                             synchronize)))
        rows.append((backend, "fm.Linear(out=)", m, per_call_us(lambda: linear(x, out=out), calls, repeats,
                                                                synchronize)))
    # The pieces of an import, one array at a time (on CUDA: where a torch tensor's share goes).
    from ferrum_moe.arrays import _device_context, import_array
    x = put(rng.standard_normal((1, HIDDEN)).astype(np_dtype))

    def enter_context():
        with _device_context(x):
            pass

    stream = 1 if device == "cuda" else None  # the legacy default stream, as import_array asks for it
    rows.append((backend, "  import_array(x)", 1, per_call_us(lambda: import_array(x, "x"), calls, repeats)))
    rows.append((backend, "  _device_context(x)", 1, per_call_us(enter_context, calls, repeats)))
    rows.append((backend, "  x.__dlpack__()", 1, per_call_us(lambda: x.__dlpack__(max_version=(1, 1), stream=stream),
                                                               calls, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = rows_for("cpu", "cpu", lambda a: a, "float32", args.calls, args.repeats, lambda: None)
    try:
        import torch
        if torch.cuda.is_available():
            rows += rows_for("cuda", "cuda", lambda a: torch.from_numpy(a).cuda(), "float16", args.calls,
                             args.repeats, torch.cuda.synchronize)
    except ImportError:
        pass
    print(f"E {E}, top-k {TOP_K}, hidden {HIDDEN}, intermediate {INTER}; median of {args.repeats} x {args.calls} calls")
    print("| backend | call | M | us per call |")
    print("| --- | --- | ---: | ---: |")
    for backend, call, m, us in rows:
        print(f"| {backend} | {call} | {m} | {us:.1f} |")


if __name__ == "__main__":
    main()
