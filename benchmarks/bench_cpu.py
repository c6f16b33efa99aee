"""CPU backend benchmark: one MoE layer and one Linear, against this machine's
measured memory bandwidth and a dense PyTorch matmul on dequantized weights
(the same math without quantization, when torch is installed).

    python benchmarks/bench_cpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import ferrum_moe as fm
from ferrum_moe.testing import random_codes_weight

MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v2-lite": (64, 6, 2048, 1408)}


def median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 512 MiB copy, read + write counted."""
    a = np.ones(1 << 29, np.uint8)
    b = np.empty_like(a)
    return 2 * a.nbytes / median_seconds(lambda: np.copyto(b, a), 5)


def random_codes(rng, e, k, n):
    return [random_codes_weight(rng, k, n) for _ in range(e)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    info = [b for b in fm.backends() if b.name == "cpu"][0]
    print(f"CPU backend: {info.description}; {os.cpu_count()} cores; memory copy {bw / 1e9:.1f} GB/s")
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    print(f"{'case':<34} {'M':>5} {'ms':>9} {'INT4 GB/s':>10} {'% of copy':>10} {'torch fp32 dense ms':>20}")
    k, n = 4096, 4096
    w = random_codes(rng, 1, k, n)[0]
    lin = fm.Linear.from_gptq(w, dtype="float32")
    dense = torch.from_numpy(w.dequantize(np.float32)) if torch else None
    for m in (1, 16, 256):
        x = rng.standard_normal((m, k)).astype(np.float32)
        s = median_seconds(lambda: lin(x))
        ref = median_seconds(lambda: torch.from_numpy(x) @ dense) if torch else float("nan")
        gbs = w.qweight.nbytes / s / 1e9
        rows.append(dict(case=f"Linear {k}x{n}", m=m, ms=s * 1e3, int4_gbs=gbs, torch_dense_ms=ref * 1e3))
        print(f"{'Linear ' + str(k) + 'x' + str(n) + ' float32':<34} {m:>5} {s * 1e3:>9.2f} {gbs:>10.2f} "
              f"{2 * gbs / (bw / 1e9):>9.0%} {ref * 1e3:>20.2f}")
    for model, (e, top_k, hidden, inter) in MODELS.items():
        layer = fm.MoE(fm.ExpertStack.from_gptq(random_codes(rng, e, hidden, 2 * inter), dtype="float16"),
                       fm.ExpertStack.from_gptq(random_codes(rng, e, inter, hidden), dtype="float16"), top_k=top_k)
        for m in (1, 16, 64):
            x = rng.standard_normal((m, hidden)).astype(np.float16)
            logits = rng.standard_normal((m, e))
            ids = np.argsort(-logits, axis=1)[:, :top_k].astype(np.int32)
            tw = np.full((m, top_k), 1.0 / top_k, np.float32)
            s = median_seconds(lambda: layer(x, tw, ids))
            active = len(np.unique(ids))
            gbs = active * (hidden * 2 * inter + inter * hidden) / 2 / s / 1e9
            rows.append(dict(case=f"MoE {model}", m=m, ms=s * 1e3, int4_gbs=gbs))
            print(f"{'MoE ' + model + ' float16':<34} {m:>5} {s * 1e3:>9.2f} {gbs:>10.2f} {2 * gbs / (bw / 1e9):>9.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=info.description, copy_bytes_per_s=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
