"""Per-kernel GPU time of one MoE layer call (torch.profiler), for kernel work:
which of align, the two GEMMs, the activation and the sum costs what, and,
against the layer's CUDA-graph replay time (bench_moe.py's measure), how much
of a call is none of them: the launches and the waits between dependent
kernels. L2 is flushed before each call, as in bench_moe.py. A kernel launched
early by programmatic dependent launch counts its wait for the one before it
as its own time, so "the rest" is a lower bound (negative: kernels overlapped).
--steps adds what each step of the layer's chain adds to the graph replay
(the chain cut after each step, the overlap included), the chain without
the align step (its routing computed once beforehand), and the chain on pair
routing (no align: ABI 1.2) at the same token count, step by step, its first
GEMM gated where the backend has that for the stack: what fusing or removing
a step can save.

    python benchmarks/profile_moe.py [--model mixtral] [--tokens 1] [--steps]
"""

import argparse

import numpy as np
import torch

import ferrum_moe as fm
from ferrum_moe.arrays import import_array, import_output, stream_handle
from ferrum_moe.moe import _Workspace, layer_block_size
from ferrum_moe.routing import _align, align_block

from gpu_bench import L2Flush, ferrum_stack, layer_shape, random_stacked, time_graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral", help="a gpu_bench.MODELS name, or name:E:top_k:hidden:inter")
    parser.add_argument("--tokens", default="1")
    parser.add_argument("--steps", action="store_true", help="graph-replay time of each prefix of the chain")
    args = parser.parse_args()
    e, top_k, hidden, inter = layer_shape(args.model)
    rng = np.random.default_rng(0)
    flush = L2Flush()
    layer = fm.MoE(ferrum_stack(random_stacked(rng, e, hidden, 2 * inter), "float16"),
                   ferrum_stack(random_stacked(rng, e, inter, hidden), "float16"), top_k=top_k)
    for m in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        tw, ids = torch.topk(torch.softmax(torch.randn(m, e, device="cuda"), -1), top_k)
        ids, tw = ids.int().contiguous(), tw.contiguous()
        out = torch.empty(m, hidden, device="cuda", dtype=torch.float16)
        for _ in range(3):
            layer(x, tw, ids, out=out)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                flush()
                layer(x, tw, ids, out=out)
            torch.cuda.synchronize()
        graph_us = time_graph(lambda s: layer(x, tw, ids, out=out, stream=s), flush, 30)
        print(f"== {args.model} M={m}: GPU time per call by kernel (us)")
        kernels_us = 0.0
        for evt in sorted(prof.key_averages(), key=lambda k: -k.device_time_total):
            if evt.device_time_total > 0 and "FillFunctor" not in evt.key:  # the L2 flush
                kernels_us += evt.device_time_total / 10
                print(f"  {evt.device_time_total / 10:9.1f}  x{evt.count // 10:<3} {evt.key[:100]}")
        print(f"  kernels {kernels_us:.1f} us; the layer's graph replay {graph_us:.1f} us; "
              f"the rest (launches, dependent waits) {graph_us - kernels_us:.1f} us")
        if args.steps:
            step_times(layer, x, tw, ids, out, flush)


def step_times(layer, x, tw, ids, out, flush) -> None:
    """The layer's five launches (as moe._forward makes them, routing weights on
    the second GEMM) timed as graphs cut after each step, and without align."""
    w13, w2 = layer.w13, layer.w2
    core, dev = w13._core.backend, tuple(w13._core.device)
    m, top_k = ids.shape
    e = w13.num_experts
    block = align_block(layer_block_size(w13, w2, top_k, m), m * top_k, e)  # this chain aligns
    h = stream_handle(torch.cuda.current_stream())
    xt, idt, twt = import_array(x, "x", h), import_array(ids, "topk_ids", h), import_array(tw, "topk_weights", h)
    tw_pairs, ot = twt.view([m * top_k, 1]), import_output(out, "out", h)
    ws = _Workspace()
    gate_up = ws.take("gate_up", core, dev, w13.dtype, [m * top_k, 2 * w2.k], h)
    act = ws.take("act", core, dev, w13.dtype, [m * top_k, w2.k], h)
    down = ws.take("down", core, dev, "float32", [m * top_k, w13.k], h)
    sorted_ids, expert_ids, post = _align(core, idt, block, e, None, h, ws)
    torch.cuda.synchronize()
    steps = [
        ("align", lambda s: _align(core, idt, block, e, None, s, ws)),
        ("w13 GEMM", lambda s: w13._core.gemm_routed(xt, sorted_ids, expert_ids, post, block, top_k, None, gate_up, s)),
        ("activation", lambda s: core.gated_activation(gate_up, act, s)),
        ("w2 GEMM", lambda s: w2._core.gemm_routed(act, sorted_ids, expert_ids, post, block, 1, tw_pairs, down, s)),
        ("top-k sum", lambda s: core.moe_sum(down, idt, e, None, ot, s)),
    ]

    def chain(steps, first: int, last: int) -> float:
        def run(stream) -> None:
            for _, step in steps[first:last + 1]:
                step(stream_handle(stream))
        return time_graph(run, flush, 30)

    def each_step(steps, prefix: str = "") -> None:
        before = 0.0
        for i, (name, _) in enumerate(steps):
            upto = chain(steps, 0, i)
            print(f"  {prefix}up to {name:<11} {upto:7.1f} us (+{upto - before:5.1f})")
            before = upto

    each_step(steps)
    print(f"  without align: {chain(steps, 1, len(steps) - 1):.1f} us")
    if core.has_pair_routing:
        # The same chain on pair routing (ABI 1.2), at any token count, step
        # by step: what the layer's rule for when to skip align should weigh.
        # Its first GEMM gated where the backend has that for this stack (the
        # layer's own path; on CUDA the decode GEMV's), else GEMM and activation.
        pair_ids = idt.view([m * top_k, 1])
        gated = w13._core.gemm_routed_pairs(xt, idt, e, None, None, None, h, gated_out=act)
        torch.cuda.synchronize()
        first = [("w13 gated", lambda s: w13._core.gemm_routed_pairs(xt, idt, e, None, None, None, s, gated_out=act))]
        if not gated:
            first = [("w13 GEMM", lambda s: w13._core.gemm_routed_pairs(xt, idt, e, None, None, gate_up, s)), steps[2]]
        pair_steps = first + [
            ("w2 GEMM", lambda s: w2._core.gemm_routed_pairs(act, pair_ids, e, None, tw_pairs, down, s)),
            steps[4],
        ]
        each_step(pair_steps, "pair-routed: ")
        print(f"  pair-routed: {chain(pair_steps, 0, len(pair_steps) - 1):.1f} us")


if __name__ == "__main__":
    main()
