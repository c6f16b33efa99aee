"""Side by side: ferrum-moe's times from several bench_moe.py (or several
bench_linear.py) JSON files (an A/B of plugin builds run in one device call),
with the peer's time from the first (vLLM's, or torch's fp16 matmul), each
run's ratio to the first and the geometric mean of those ratios.

    python benchmarks/compare_runs.py main=a.json v22=b.json [v23=c.json ...]
"""

from __future__ import annotations

import argparse
import json
import math


def load(spec: str) -> tuple[str, dict]:
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = spec, spec
    with open(path) as f:
        run = json.load(f)
    return label, {key_of(r): r for r in run["rows"]}


def key_of(row: dict) -> tuple:
    if "model" in row:  # bench_moe.py
        return row["model"], row["dtype"], row["m"]
    return f"{row['k']} x {row['n']}", "float16", row["m"]  # bench_linear.py


def peer_of(row: dict) -> float | None:
    return row.get("vllm_us") or row.get("torch_fp16_us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=bench_moe.json or LABEL=bench_linear.json (the first is the base)")
    args = parser.parse_args()
    runs = [load(spec) for spec in args.runs]
    (base_label, base), others = runs[0], runs[1:]
    keys = [k for k in base if all(k in rows for _, rows in others)]
    linear = any("torch_fp16_us" in r for r in base.values())
    head = ["K x N" if linear else "layer", "dtype", "M", "torch fp16 us" if linear else "vLLM us",
            f"{base_label} us"]
    for label, _ in others:
        head += [f"{label} us", f"{label} / {base_label}"]
    print("| " + " | ".join(head) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in head[2:]) + " |")
    logs = {label: [] for label, _ in others}
    for key in keys:
        b = base[key]
        peer = peer_of(b)
        cells = [key[0], key[1], str(key[2]), f"{peer:.1f}" if peer else "-", f"{b['ferrum_us']:.1f}"]
        for label, rows in others:
            t = rows[key]["ferrum_us"]
            cells += [f"{t:.1f}", f"{t / b['ferrum_us']:.3f}"]
            logs[label].append(math.log(t / b["ferrum_us"]))
        print("| " + " | ".join(cells) + " |")
    for label, values in logs.items():
        if values:
            print(f"{label} / {base_label}: geometric mean {math.exp(sum(values) / len(values)):.3f} over {len(values)} rows")


if __name__ == "__main__":
    main()
