"""The CPU backend's kernel sets side by side on one machine: each set this CPU
runs (FERRUM_MOE_CPU_ISA, one child process each) on the same bf16 Linear
shapes, with PyTorch's bf16 matmul on bf16 weights of the same shape (oneDNN,
which uses AMX where the CPU has it) in the same run. Weights L3-sized or larger,
warm: this compares the kernels' compute rates, not the memory.

    python benchmarks/bench_cpu_isa.py [--threads 2] [--isas amx,avx512bf16,...] [--shapes 4096x4096,...]
                                       [--rows 16,64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

def best_seconds(call, m: int) -> float:
    """The best of 5 timings of a warm call, each a mean over enough repeats."""
    call()
    reps, best = max(2, 2000 // m), float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def ferrum_rows(shapes, rows) -> list[dict]:
    """fm.Linear in bfloat16 with the kernel set FERRUM_MOE_CPU_ISA picked."""
    import ml_dtypes
    import numpy as np

    import ferrum_moe as fm
    from ferrum_moe.testing import random_codes_weight

    rng = np.random.default_rng(0)
    out = []
    for k, n in shapes:
        lin = fm.Linear.from_gptq(random_codes_weight(rng, k, n, scale_dtype=np.float32), dtype="bfloat16")
        for m in rows:
            x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
            y = np.empty((m, n), ml_dtypes.bfloat16)
            out.append({"k": k, "n": n, "m": m, "s": best_seconds(lambda: lin(x, out=y), m)})
    return out


def torch_rows(shapes, rows, threads):
    import torch
    torch.set_num_threads(threads)
    result = {}
    for k, n in shapes:
        w = torch.randn(n, k, dtype=torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            result[(k, n, m)] = best_seconds(lambda: torch.nn.functional.linear(x, w), m)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="4096x4096,2048x1536")
    parser.add_argument("--rows", default="16,64,256")
    parser.add_argument("--isas", default="amx,avx512bf16,avx512,avx2,generic")
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help="(internal) one kernel set's rows, as JSON")
    args = parser.parse_args()
    shapes = [[int(v) for v in s.split("x")] for s in args.shapes.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(json.dumps({"rows": ferrum_rows(shapes, rows)}))
        return
    env = dict(os.environ, FERRUM_MOE_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    runs = {}
    for isa in args.isas.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", "--shapes", args.shapes, "--rows", args.rows],
                              env=dict(env, FERRUM_MOE_CPU_ISA=isa), capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{isa}: not run here ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'})")
            continue
        runs[isa] = json.loads(done.stdout.strip().splitlines()[-1])
    peer = torch_rows(shapes, rows, args.threads)
    isas = list(runs)
    print(f"{args.threads} threads; torch bf16: oneDNN\n")
    print("| K x N | M | torch bf16 GFLOP/s | " + " | ".join(f"{i} GFLOP/s" for i in isas) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in isas) + " |")
    table = []
    for k, n in shapes:
        for m in rows:
            flop = 2 * m * k * n
            cells = [f"{flop / peer[(k, n, m)] / 1e9:.0f}"]
            row = {"k": k, "n": n, "m": m, "torch_bf16_s": peer[(k, n, m)]}
            for isa in isas:
                s = next(r["s"] for r in runs[isa]["rows"] if (r["k"], r["n"], r["m"]) == (k, n, m))
                cells.append(f"{flop / s / 1e9:.0f}")
                row[f"{isa}_s"] = s
            table.append(row)
            print(f"| {k} x {n} | {m} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
