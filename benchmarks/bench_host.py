"""The host's cost of a call through the Python API: warm calls of fm.MoE,
fm.fused_moe and fm.Linear on layers so small that the kernels take next to
nothing, numpy in and out on the CPU backend (and torch on CUDA where a GPU is
there, timed to a synchronize after the calls: the slower of issuing and running
them, at these sizes issuing).

    python benchmarks/bench_host.py [--calls 4000] [--repeats 5]

Prints the median over the repeats of the mean time per call, in microseconds; a layer
call's steps issued one at a time (the imports, each backend call; on CUDA the time to
issue, in bursts the GPU keeps up with); and the pieces of one array's import (the import,
the device context it enters, the producer's __dlpack__), untimed by a synchronize.
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
    rows += step_rows(backend, layer, put, np_dtype, rng, calls, repeats, synchronize)
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


def issue_us(call, calls: int, repeats: int, synchronize) -> float:
    """Host time to issue one call, in bursts of at most 100 timed without a
    synchronize (on CUDA the queue then never fills, so the GPU's own time is
    not counted); median over the repeats."""
    burst = min(calls, 100)
    for _ in range(burst):
        call()
    times = []
    for _ in range(repeats):
        total = 0.0
        for _ in range(max(calls // burst, 1)):
            synchronize()
            start = time.perf_counter()
            for _ in range(burst):
                call()
            total += time.perf_counter() - start
        times.append(total / (max(calls // burst, 1) * burst) * 1e6)
    synchronize()
    return statistics.median(times)


def step_rows(backend: str, layer, put, np_dtype, rng, calls: int, repeats: int, synchronize):
    """A warm fm.MoE(out=) call's steps issued one at a time (the arrays
    imported beforehand): the four imports' first, then each backend call as
    moe._forward makes it at M = 1 (pair routing) and M = 4 (align); what the
    layer call costs beyond their sum is its Python."""
    from ferrum_moe.arrays import import_array

    core, w13, w2 = layer.w13._backend, layer.w13._core, layer.w2._core
    dev, dtype, rows = layer.w13._device, layer.w13.dtype, []
    for m in (1, 4):
        pairs = m * TOP_K
        x = put(rng.standard_normal((m, HIDDEN)).astype(np_dtype))
        ids = put(np.argsort(-rng.standard_normal((m, E)), axis=1)[:, :TOP_K].astype(np.int32))
        tw = put(rng.random((m, TOP_K)).astype(np.float32))
        out = put(np.empty((m, HIDDEN), np_dtype))
        xt, it, twt, ot = (import_array(a, "a") for a in (x, ids, tw, out))
        gate_up, act = (core.empty(dev[0], dev[1], dtype, [pairs, w], 0) for w in (2 * INTER, INTER))
        down = core.empty(dev[0], dev[1], "float32", [pairs, HIDDEN], 0)
        steps = [("import_array(out)", lambda: import_array(out, "out"))]
        if m == 1:
            steps += [("w13 gemm_routed_pairs", lambda: w13.gemm_routed_pairs(xt, it, E, None, None, gate_up, 0)),
                      ("gated_activation", lambda: core.gated_activation(gate_up, act, 0)),
                      ("w2 gemm_routed_pairs", lambda: w2.gemm_routed_pairs(act, it.view([pairs, 1]), E, None,
                                                                            twt.view([pairs, 1]), down, 0))]
        else:
            block = 8
            routing = fm.routing._align(core, it, block, E, None, 0)
            steps += [("moe_align_block_size", lambda: core.moe_align_block_size(it, E, block, None, *routing, 0)),
                      ("w13 gemm_routed", lambda: w13.gemm_routed(xt, *routing, block, TOP_K, None, gate_up, 0)),
                      ("gated_activation", lambda: core.gated_activation(gate_up, act, 0)),
                      ("w2 gemm_routed", lambda: w2.gemm_routed(act, *routing, block, 1, twt.view([pairs, 1]), down,
                                                                0))]
        steps.append(("moe_sum", lambda: core.moe_sum(down, it, E, None, ot, 0)))
        whole = issue_us(lambda: layer(x, tw, ids, out=out), calls, repeats, synchronize)
        parts = [(name, issue_us(call, calls, repeats, synchronize)) for name, call in steps]
        rows.append((backend, "fm.MoE(out=), issue only", m, whole))
        rows += [(backend, f"  {name}", m, us) for name, us in parts]
        rows.append((backend, "  the rest (Python, 3 more imports)", m, whole - sum(us for _, us in parts)))
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
