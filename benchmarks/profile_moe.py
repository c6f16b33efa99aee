"""Per-kernel GPU time of one MoE layer call (torch.profiler), for kernel work:
which of align, the two GEMMs, the activation and the sum costs what.

    python benchmarks/profile_moe.py [--model mixtral] [--tokens 1]
"""

import argparse

import numpy as np
import torch

import ferrum_moe as fm

from gpu_bench import MODELS, ferrum_stack, random_stacked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral")
    parser.add_argument("--tokens", default="1")
    args = parser.parse_args()
    e, top_k, hidden, inter = MODELS[args.model]
    rng = np.random.default_rng(0)
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
                layer(x, tw, ids, out=out)
            torch.cuda.synchronize()
        print(f"== {args.model} M={m}: GPU time per call by kernel (us)")
        for evt in sorted(prof.key_averages(), key=lambda k: -k.device_time_total):
            if evt.device_time_total > 0:
                print(f"  {evt.device_time_total / 10:9.1f}  x{evt.count // 10:<3} {evt.key[:100]}")


if __name__ == "__main__":
    main()
