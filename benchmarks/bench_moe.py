"""Whole-MoE-layer benchmark on a GPU: ferrum-moe against the physical limits
measured in the same run (device copy bandwidth, cuBLAS fp16 rate) and the
peers' figures recorded in shared/PEERS.md (vLLM Marlin MoE, same device kind).

Timing: one CUDA-graph replay of the layer (routing included), L2 flushed
before each, median of repeats. The routing is drawn from a fixed seed per
token count, so runs and versions compare on the same work. Prints a table; writes JSON with --json.

    python benchmarks/bench_moe.py [--models mixtral,...] [--tokens 1,16,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

import ferrum_moe as fm
from ferrum_moe.testing import random_codes_weight

MODELS = {"mixtral": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v2-lite": (64, 6, 2048, 1408)}
# vLLM Marlin MoE, microseconds, from shared/PEERS.md (H100 80GB HBM3, 2026-11-22; routing not in its time).
VLLM_MARLIN_US = {
    "mixtral": {1: 97.7, 4: 190.2, 16: 278.4, 64: 377.1, 256: 938.1, 1024: 2822.8, 4096: 10400.1},
    "qwen3-30b-a3b": {1: 35.5, 4: 56.3, 16: 109.2, 64: 147.9, 256: 212.7, 1024: 503.0, 4096: 1460.8},
    "deepseek-v2-lite": {1: 41.1, 4: 64.3, 16: 113.7, 64: 135.9, 256: 191.3, 1024: 582.4, 4096: 1815.8},
}


def time_graph(fn, flush: torch.Tensor, repeats: int) -> float:
    """Median microseconds of one replay of fn captured in a graph, L2 flushed before each."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(s)
    s.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn(s)
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + write counted."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) * 1e-3)


def tensor_core_rate() -> float:
    """FLOP/s of cuBLAS fp16 8192^3."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) * 1e-3)


def random_codes_stack(rng, e, k, n):
    return fm.ExpertStack.from_gptq([random_codes_weight(rng, k, n) for _ in range(e)], device="cuda",
                                    dtype="float16")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bw, rate = copy_bandwidth(), tensor_core_rate()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bw / 1e12:.2f} TB/s, cuBLAS fp16 {rate / 1e12:.0f} TFLOP/s")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for model in args.models.split(","):
        e, top_k, hidden, inter = MODELS[model]
        s13 = random_codes_stack(rng, e, hidden, 2 * inter)
        s2 = random_codes_stack(rng, e, inter, hidden)
        layer = fm.MoE(s13, s2, top_k=top_k)
        expert_bytes = (hidden * 2 * inter + inter * hidden) * (0.5 + 2 / 128)
        for m in (int(t) for t in args.tokens.split(",")):
            # The same routing in every run, so versions compare on equal work.
            torch.manual_seed(m)
            x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
            tw, ids = torch.topk(torch.softmax(torch.randn(m, e, device="cuda"), -1), top_k)
            ids = ids.int().contiguous()
            tw = tw.contiguous()
            out = torch.empty(m, hidden, device="cuda", dtype=torch.float16)
            us = time_graph(lambda s: layer(x, tw, ids, out=out, stream=s), flush, args.repeats)
            active = len(torch.unique(ids))
            memory_floor = active * expert_bytes / bw * 1e6
            compute_floor = 2 * m * top_k * 3 * hidden * inter / rate * 1e6
            floor = max(memory_floor, compute_floor)
            peer = VLLM_MARLIN_US.get(model, {}).get(m)
            rows.append(dict(model=model, m=m, us=us, memory_floor_us=memory_floor, compute_floor_us=compute_floor,
                             floor_fraction=floor / us, vllm_marlin_us=peer, device=device))
            print(f"{model:<17} M={m:<5} {us:9.1f} us  floor {floor:8.1f} us ({floor / us:4.0%})"
                  f"  vLLM Marlin {peer if peer else float('nan'):8.1f} us")
    print()
    print("| shape | M | ferrum-moe us | floor us | floor / ferrum | vLLM Marlin MoE us (PEERS.md) | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        floor = max(r["memory_floor_us"], r["compute_floor_us"])
        peer = r["vllm_marlin_us"]
        print(f"| {r['model']} | {r['m']} | {r['us']:.1f} | {floor:.1f} | {r['floor_fraction']:.0%} | "
              f"{peer if peer else '-'} | {peer / r['us'] if peer else float('nan'):.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bytes_per_s=bw, tensor_core_flops=rate, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
