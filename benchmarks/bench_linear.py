"""Dense INT4 Linear on a GPU against torch's fp16 matmul on the same shape
and the memory floor (INT4 bytes + fp16 scales over the copy bandwidth
measured in the same run). CUDA-graph replay, L2 flushed before each (--flush:
by a memset, the default, whose dirty lines the next kernel's misses write back,
or by a read that leaves L2 clean; gpu_bench.L2Flush).

    python benchmarks/bench_linear.py [--shapes 4096x14336,...] [--tokens 1,16,...] [--flush write|read]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from gpu_bench import (BYTES_PER_WEIGHT, L2Flush, copy_bandwidth, dequantized_bf16, ferrum_stack, random_stacked,
                       time_graph)

SHAPES = "4096x14336,8192x28672,14336x4096,7168x2048"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--flush", choices=L2Flush.MODES, default="write",
                        help="how L2 is evicted before each replay: write (a memset: L2 left dirty, the basis of "
                             "docs/benchmarks.md) or read (a sum: L2 left clean)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bw / 1e12:.2f} TB/s; L2 flushed by a {args.flush}")
    flush = L2Flush(args.flush)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        stacked = random_stacked(rng, 1, k, n)
        lin = ferrum_stack(stacked, "float16").expert(0)
        dense = dequantized_bf16(stacked)[0].to(torch.float16).contiguous()  # [K, N] row-major
        floor = k * n * BYTES_PER_WEIGHT / bw * 1e6
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            out, ref = (torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(2))
            ours = time_graph(lambda s: lin(x, out=out, stream=s), flush, args.repeats)
            theirs = time_graph(lambda s: torch.matmul(x, dense, out=ref), flush, args.repeats)
            diff = float((out.float() - ref.float()).norm() / ref.float().norm())
            rows.append(dict(k=k, n=n, m=m, ferrum_us=ours, torch_fp16_us=theirs, memory_floor_us=floor,
                             rel_diff=diff, device=device))
            print(f"{k}x{n} M={m:<5} ferrum {ours:8.1f} us  torch fp16 {theirs:8.1f} us  floor {floor:6.1f} us  "
                  f"diff {diff:.1e}", flush=True)
    print()
    print("| K x N | M | memory floor us | torch fp16 matmul us | ferrum-moe us | floor / ferrum | torch / ferrum |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['k']} x {r['n']} | {r['m']} | {r['memory_floor_us']:.1f} | {r['torch_fp16_us']:.1f} | "
              f"{r['ferrum_us']:.1f} | {r['memory_floor_us'] / r['ferrum_us']:.0%} | "
              f"{r['torch_fp16_us'] / r['ferrum_us']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bytes_per_s=bw, l2_flush=args.flush, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
