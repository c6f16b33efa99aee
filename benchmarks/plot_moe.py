"""Plots bench_moe.py's JSON: layer time against M for each model, ferrum-moe
beside vLLM's Marlin MoE, the bf16 grouped GEMM and both floors (log-log).

    python benchmarks/plot_moe.py bench-moe.json docs/bench-moe-h200.png [--dtype float16]
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("png")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    with open(args.json) as f:
        run = json.load(f)
    rows = [r for r in run["rows"] if r["dtype"] == args.dtype]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sorted({r["m"]: r for r in rows if r["model"] == model}.values(), key=lambda r: r["m"])
        m = [r["m"] for r in mine]
        series = [("ferrum-moe", "ferrum_us", "C0", "o-"), ("vLLM Marlin MoE", "vllm_us", "C1", "s-"),
                  ("torch bf16 grouped", "grouped_bf16_us", "C2", "^-")]
        for label, key, color, style in series:
            points = [(r["m"], r[key]) for r in mine if r.get(key)]
            if points:
                ax.plot(*zip(*points), style, color=color, label=label, markersize=4)
        ax.plot(m, [r["memory_floor_us"] for r in mine], ":", color="gray", label="memory floor")
        ax.plot(m, [r["compute_floor_us"] for r in mine], "--", color="gray", label="tensor-core floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("tokens M")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("layer time, us (lower is better)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{run['device']}, {args.dtype}: whole MoE layer, CUDA-graph replay, L2 flushed", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
