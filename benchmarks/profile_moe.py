"""Per-kernel GPU time of one MoE layer call (torch.profiler), for kernel work:
which of align, the two GEMMs, the activation and the sum costs what, and,
against the layer's CUDA-graph replay time (bench_moe.py's measure), how much
of a call is none of them: the launches and the waits between dependent
kernels. L2 is flushed before each call, as in bench_moe.py. A kernel launched
early by programmatic dependent launch counts its wait for the one before it
as its own time, so "the rest" is a lower bound (negative: kernels overlapped).

    python benchmarks/profile_moe.py [--model mixtral] [--tokens 1]
"""

import argparse

import numpy as np
import torch

import ferrum_moe as fm

from gpu_bench import MODELS, ferrum_stack, random_stacked, time_graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral")
    parser.add_argument("--tokens", default="1")
    args = parser.parse_args()
    e, top_k, hidden, inter = MODELS[args.model]
    rng = np.random.default_rng(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
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
                flush.zero_()
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


if __name__ == "__main__":
    main()
