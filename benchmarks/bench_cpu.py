"""The CPU backend side by side with PyTorch's CPU kernels on the same weights,
against this machine's limits measured in the same run.

    python benchmarks/bench_cpu.py [--json out.json] [--markdown out.md] [--plot out.png]

Contenders, in one process, on the same INT4 codes (GPTQ symmetric, group 128,
bf16 scales):
  ferrum-moe bf16 / fp32   fm.Linear or fm.MoE with bfloat16 / float32 activations
  torch int4               aten._weight_int4pack_mm_for_cpu (bf16 activations)
  torch bf16 / fp32        F.linear on the dequantized weights (oneDNN / MKL)
Limits (benchmarks/machine_limits.c, built here with the system C compiler):
  memory floor             INT4 codes + bf16 scales / the best multi-threaded
                           streaming-read bandwidth (1 GiB of distinct data on
                           huge pages)
  compute roof             FLOPs / the peak rate of vdpbf16ps (bf16) or FMA (fp32)
Weights come from memory, as in a model too large for the caches: every
contender holds enough copies of its weights (each its own random codes) that
the calls cycling through them read 256 MiB (eight times this machine's L3)
between two calls on the same copy, so each call's weights come from memory
while the code and the Python objects stay as warm as between a model's layers
(a whole-cache flush before each call would also make the Python call path
cold and time that instead). MoE layers cycle through different routings. Each figure is the median
of repeats (fewer for slow cases), with its spread recorded.

Single experts (K x N) run at M in 1 .. 1024, whole MoE layers (routing, both
GEMMs, activation, top-k sum) at M in 1, 16, 256 with PyTorch's per-expert
loop as the peer. A second process repeats a subset with one thread.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # torch's large tensors on huge pages too, as ours are

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ferrum_moe as fm  # noqa: E402
from ferrum_moe.gptq import unpack  # noqa: E402
from ferrum_moe.testing import random_codes_weight  # noqa: E402

COLD_BYTES = 256 << 20  # weights cycled through between two calls on the same copy

EXPERTS = [(2048, 1536, "Qwen3-30B-A3B w13"), (768, 2048, "Qwen3-30B-A3B w2"), (4096, 28672, "Mixtral w13"),
           (7168, 4096, "DeepSeek-V3 w13")]
ROWS = [1, 2, 4, 16, 64, 256, 1024]
MODELS = {"Qwen3-30B-A3B": (128, 8, 2048, 768), "DeepSeek-V2-Lite": (64, 6, 2048, 1408)}
MOE_ROWS = [1, 16, 256]
GROUP = 128
HERE = os.path.dirname(os.path.abspath(__file__))


class Machine:
    """machine_limits.c: read bandwidth and peak rates."""

    def __init__(self, threads: int):
        self.threads = threads
        self._dir = tempfile.mkdtemp(prefix="ferrum_bench_")
        lib = os.path.join(self._dir, "machine_limits.so")
        subprocess.run([os.environ.get("CC", "cc"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                        os.path.join(HERE, "machine_limits.c"), "-o", lib], check=True)
        self.lib = ctypes.CDLL(lib)
        self.lib.ml_alloc.restype = ctypes.c_void_p
        self.lib.ml_alloc.argtypes = [ctypes.c_size_t]
        self.lib.ml_read.restype = ctypes.c_double
        self.lib.ml_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t]
        self.lib.ml_peak_flops.restype = ctypes.c_double
        self.lib.ml_peak_flops.argtypes = [ctypes.c_int, ctypes.c_int]

    def read_bandwidth(self, distances=(0, 1024, 2048, 4096, 8192, 16384), reps: int = 10) -> dict:
        """Best (and median) bytes/s of reading 1 GiB with all threads, over prefetch distances."""
        n = 1 << 30
        buf = self.lib.ml_alloc(n)
        best = {ahead: [n / self.lib.ml_read(buf, n, self.threads, ahead) for _ in range(reps)] for ahead in distances}
        self.lib.ml_free(ctypes.c_void_p(buf))
        ahead, rates = max(best.items(), key=lambda kv: max(kv[1]))
        return dict(bytes_per_s=max(rates), median=statistics.median(rates), prefetch_ahead=ahead)

    def peak(self, kind: int) -> float:
        return max(self.lib.ml_peak_flops(self.threads, kind) for _ in range(3))


def measure(calls, budget_s: float = 2.0) -> dict:
    """Median seconds of repeats cycling through `calls` (one per copy of the
    weights, or per routing), after one pass over all of them; fewer repeats
    when slow."""
    for call in calls:
        call()
    t = time.perf_counter()
    calls[0]()
    first = time.perf_counter() - t
    reps = int(min(15, max(3, budget_s / max(first, 1e-6))))
    times = []
    for i in range(reps):
        call = calls[(i + 1) % len(calls)]
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(s=med, min=min(times), max=max(times), reps=reps, copies=len(calls))


def copies(nbytes: int) -> int:
    """Copies such that the others, read between two calls on one, hold COLD_BYTES."""
    return 1 + -(-COLD_BYTES // nbytes)


def int4_bytes(k: int, n: int) -> int:
    return k * n // 2 + -(-k // GROUP) * n * 2  # codes + bf16 scales


class Expert:
    """One K x N INT4 matrix in every contender's format."""

    def __init__(self, rng, k: int, n: int, dense=("bf16", "f32")):
        self.k, self.n = k, n
        self.w = random_codes_weight(rng, k, n, group_size=GROUP, scale_dtype=ml_dtypes.bfloat16)
        q = unpack(self.w.qweight, 4, k).astype(np.int32)                   # [K, N] codes
        scales = torch.from_numpy(np.asarray(self.w.scales, np.float32))    # [G, N], bf16 values
        self.int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.T.copy()), 1)
        # torch's int4 dequantizes (q - 8) * scale + zero.
        self.scale_zero = torch.stack([scales, torch.zeros_like(scales)], -1).to(torch.bfloat16).contiguous()
        self.bf16 = self.f32 = None
        if dense:
            w = ((torch.from_numpy(q).float() - 8) * scales.repeat_interleave(GROUP, 0)[:k]).T  # [N, K]: nn.Linear's layout
            self.bf16 = w.to(torch.bfloat16).contiguous() if "bf16" in dense else None
            self.f32 = w.contiguous() if "f32" in dense else None

    def torch_int4(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4, GROUP, self.scale_zero)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def local_bandwidth(machine: Machine, ahead: int) -> float:
    """The read bandwidth again, just before a case: this VM's memory rate drifts
    (35-75 GB/s over one afternoon), so each floor uses the rate of its moment."""
    return machine.read_bandwidth((0, ahead), reps=5)["bytes_per_s"]


def expert_rows(machine, ahead, rng, k, n, name, rows, peak_bf16, peak_f32, peers=True) -> list[dict]:
    # Every copy its own random codes: copies of equal bytes can share physical
    # pages (merged below the VM) and then read from cache.
    cycle = copies(int4_bytes(k, n))
    cycle_bf16, cycle_f32 = (copies(k * n * 2), copies(k * n * 4)) if peers else (0, 0)
    experts = [Expert(rng, k, n, dense=("bf16",) * (i < cycle_bf16) + ("f32",) * (i < cycle_f32))
               for i in range(max(cycle, cycle_bf16, cycle_f32))]
    e = experts[0]
    ours_bf16 = [fm.Linear.from_gptq(x.w, dtype="bfloat16") for x in experts[:cycle]]
    ours_f32 = [fm.Linear.from_gptq(x.w, dtype="float32") for x in experts[:cycle]]
    int4 = [(x.int4, x.scale_zero) for x in experts[:cycle]]
    dense_bf16 = [x.bf16 for x in experts[:cycle_bf16]]
    dense_f32 = [x.f32 for x in experts[:cycle_f32]]
    out = []
    bw = local_bandwidth(machine, ahead)
    for m in rows:
        xb = torch.randn(m, k).to(torch.bfloat16)
        xf = xb.float()
        ob, of = torch.empty(m, n, dtype=torch.bfloat16), torch.empty(m, n)
        r = dict(case=name, k=k, n=n, m=m, read_bytes_per_s=bw, floor_s=int4_bytes(k, n) / bw,
                 roof_bf16_s=2 * m * k * n / peak_bf16,
                 roof_f32_s=2 * m * k * n / peak_f32)
        r["ours_bf16"] = measure([lambda lin=lin: lin(xb, out=ob) for lin in ours_bf16])
        r["ours_f32"] = measure([lambda lin=lin: lin(xf, out=of) for lin in ours_f32])
        r["torch_int4"] = measure([lambda w=w: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w[0], GROUP, w[1])
                                   for w in int4])
        if peers:
            r["torch_bf16"] = measure([lambda w=w: F.linear(xb, w) for w in dense_bf16])
            r["torch_f32"] = measure([lambda w=w: F.linear(xf, w) for w in dense_f32])
            ref = F.linear(xf, e.f32)
            ours_bf16[0](xb, out=ob)
            ours_f32[0](xf, out=of)
            r["error"] = dict(ours_bf16=rel(ob, ref), ours_f32=rel(of, ref), torch_int4=rel(e.torch_int4(xb), ref))
        out.append(r)
        print_expert_row(r)
    return out


class Layer:
    """A MoE layer's experts for ferrum-moe, and PyTorch's per-expert loops."""

    def __init__(self, rng, e, top_k, hidden, inter):
        self.e, self.top_k, self.hidden, self.inter = e, top_k, hidden, inter
        w13 = [Expert(rng, hidden, 2 * inter, dense=("bf16",)) for _ in range(e)]
        w2 = [Expert(rng, inter, hidden, dense=("bf16",)) for _ in range(e)]
        self.ours = fm.MoE(fm.ExpertStack.from_gptq([x.w for x in w13], dtype="bfloat16"),
                           fm.ExpertStack.from_gptq([x.w for x in w2], dtype="bfloat16"), top_k=top_k)
        self.w13, self.w2 = w13, w2
        self.expert_bytes = int4_bytes(hidden, 2 * inter) + int4_bytes(inter, hidden)

    def torch_loop(self, x, tw, ids, kind):
        """The usual PyTorch MoE: for each routed expert, its tokens through both matmuls."""
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32)
        for e in torch.unique(ids).tolist():
            tokens, slots = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tokens]
            h = self.w13[e].torch_int4(xe) if kind == "int4" else F.linear(xe, self.w13[e].bf16)
            a = F.silu(h[:, :self.inter]) * h[:, self.inter:]
            y = self.w2[e].torch_int4(a) if kind == "int4" else F.linear(a, self.w2[e].bf16)
            out.index_add_(0, tokens, y.float() * tw[tokens, slots, None])
        return out.to(x.dtype)


def moe_rows(machine, ahead, rng, name, shape, rows, routings=16) -> list[dict]:
    layer = Layer(rng, *shape)
    e, top_k, hidden, inter = shape
    out = []
    bw = local_bandwidth(machine, ahead)
    for m in rows:
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, hidden, generator=g).to(torch.bfloat16)
        # Different experts call after call (each routing's weights cold), the same token count.
        cases = [(torch.argsort(torch.randn(m, e, generator=g), dim=1)[:, :top_k].to(torch.int32),
                  torch.softmax(torch.randn(m, top_k, generator=g), dim=1)) for _ in range(routings)]
        y = torch.empty(m, hidden, dtype=torch.bfloat16)
        active = statistics.mean(len(torch.unique(ids)) for ids, _ in cases)
        r = dict(case=f"MoE {name}", m=m, active_experts=active, read_bytes_per_s=bw,
                 floor_s=active * layer.expert_bytes / bw)
        r["ours_bf16"] = measure([lambda c=c: layer.ours(x, c[1], c[0], out=y) for c in cases])
        r["torch_int4"] = measure([lambda c=c: layer.torch_loop(x, c[1], c[0], "int4") for c in cases])
        r["torch_bf16"] = measure([lambda c=c: layer.torch_loop(x, c[1], c[0], "bf16") for c in cases])
        ids, tw = cases[0]
        layer.ours(x, tw, ids, out=y)
        r["error"] = dict(ours_bf16=rel(y, layer.torch_loop(x, tw, ids, "bf16")))
        out.append(r)
        print_moe_row(r)
    return out


def concurrency(rng) -> dict:
    """Two Python threads calling at once against the same calls one after another."""
    e = Expert(rng, 4096, 28672, dense=())
    lin = fm.Linear.from_gptq(e.w, dtype="bfloat16")
    x = torch.randn(1, 4096).to(torch.bfloat16)
    calls = 20

    def run(n):
        for _ in range(n):
            lin(x)

    run(2)
    t = time.perf_counter()
    run(2 * calls)
    serial = time.perf_counter() - t
    threads = [threading.Thread(target=run, args=(calls,)) for _ in range(2)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    together = time.perf_counter() - t
    return dict(calls=2 * calls, serial_s=serial, two_threads_s=together)


def call_overhead(rng) -> float:
    """Seconds of a warm fm.Linear call on a 64 x 64 stack: the fixed cost of a
    call through the Python API (DLPack import, checks, dispatch) that every
    single-expert figure includes."""
    w = random_codes_weight(rng, 64, 64, group_size=64, scale_dtype=ml_dtypes.bfloat16)
    lin = fm.Linear.from_gptq(w, dtype="bfloat16")
    x, y = torch.randn(1, 64).to(torch.bfloat16), torch.empty(1, 64, dtype=torch.bfloat16)
    return measure([lambda: lin(x, out=y)] * 200, budget_s=1.0)["s"]


def fmt_ms(d) -> str:
    return "-" if d is None else f"{d['s'] * 1e3:.3f}"


def ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a['s'] / b['s']:.2f}"


def print_expert_row(r):
    ob, of = r["ours_bf16"], r["ours_f32"]
    print(f"{r['case']:<20} {r['k']:>5}x{r['n']:<6} M={r['m']:<5} ours bf16 {fmt_ms(ob):>9} ms "
          f"({int4_bytes(r['k'], r['n']) / ob['s'] / 1e9:5.1f} GB/s, {2 * r['m'] * r['k'] * r['n'] / ob['s'] / 1e9:6.0f} GFLOP/s)"
          f" fp32 {fmt_ms(of):>9} | int4/ours {ratio(r['torch_int4'], ob):>6} | bf16/ours {ratio(r.get('torch_bf16'), ob):>6}"
          f" | f32/ours {ratio(r.get('torch_f32'), of):>6} | floor/ours {r['floor_s'] / ob['s']:5.0%}", flush=True)


def print_moe_row(r):
    ob = r["ours_bf16"]
    print(f"{r['case']:<26} M={r['m']:<4} ({r['active_experts']:>5.1f} experts) ours {fmt_ms(ob):>9} ms | torch int4 loop "
          f"{fmt_ms(r['torch_int4']):>9} | torch bf16 loop {fmt_ms(r['torch_bf16']):>9} | ours/floor "
          f"{ob['s'] / r['floor_s']:.2f}", flush=True)


def targets(res) -> list[str]:
    """Each of the issue's targets, met or not, with the numbers."""
    lines = []
    for r in res["experts"]:
        ob, of, t4 = r["ours_bf16"]["s"], r["ours_f32"]["s"], r["torch_int4"]["s"]
        tag = f"{r['k']}x{r['n']} M={r['m']}"
        if r["m"] == 1:
            share = r["floor_s"] / ob
            lines.append(f"{'met' if share >= 0.85 and ob <= t4 else 'NOT met':<8} M=1 {tag}: {share:.0%} of read "
                         f"bandwidth (>= 85%), {t4 / ob:.2f}x torch int4 (>= 1)")
        elif r["m"] <= 16:
            lines.append(f"{'met' if t4 / ob >= 3 else 'NOT met':<8} M=2-16 {tag}: {t4 / ob:.2f}x torch int4 (>= 3)")
        elif "torch_bf16" in r:
            tb, tf = r["torch_bf16"]["s"], r["torch_f32"]["s"]
            lines.append(f"{'met' if tb / ob >= 1 else 'NOT met':<8} M>=64 bf16 {tag}: {tb / ob:.2f}x torch bf16 matmul rate"
                         f" (>= 1)")
        if r["m"] >= 64 and "torch_f32" in r:
            tf = r["torch_f32"]["s"]
            lines.append(f"{'met' if tf / of >= 0.8 else 'NOT met':<8} fp32 {tag}: {tf / of:.2f}x torch fp32 matmul rate"
                         f" (>= 0.8)")
    for r in res["moe"]:
        if r["m"] == 1:
            x = r["ours_bf16"]["s"] / r["floor_s"]
            lines.append(f"{'met' if x <= 1.3 else 'NOT met':<8} {r['case']} M=1: {x:.2f}x the active experts' floor (<= 1.3)")
    return lines


def markdown(res) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['threads']} threads, {m['date']}; {res['backend']}; PyTorch {m['torch']}. Measured in "
             f"the same run: read bandwidth {m['read']['bytes_per_s'] / 1e9:.1f} GB/s at the start (best; median "
             f"{m['read']['median'] / 1e9:.1f}; again before each case: the read GB/s columns), peak vdpbf16ps {m['peak_bf16'] / 1e9:.0f} GFLOP/s, peak FMA "
             f"{m['peak_f32'] / 1e9:.0f} GFLOP/s; a warm fm.Linear call on a 64 x 64 stack takes "
             f"{m['call_overhead_s'] * 1e6:.1f} us (the fixed cost in every row below).", "",
             "| expert K x N | M | ours bf16 ms | GB/s | GFLOP/s | ours fp32 ms | torch int4 ms | torch bf16 ms | "
             "torch fp32 ms | int4 / ours | bf16 / ours | fp32 / ours fp32 | read GB/s | floor / ours |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["experts"]:
        ob = r["ours_bf16"]
        lines.append(
            f"| {r['case']} {r['k']} x {r['n']} | {r['m']} | {fmt_ms(ob)} | {int4_bytes(r['k'], r['n']) / ob['s'] / 1e9:.1f} | "
            f"{2 * r['m'] * r['k'] * r['n'] / ob['s'] / 1e9:.0f} | {fmt_ms(r['ours_f32'])} | {fmt_ms(r['torch_int4'])} | "
            f"{fmt_ms(r.get('torch_bf16'))} | {fmt_ms(r.get('torch_f32'))} | {ratio(r['torch_int4'], ob)} | "
            f"{ratio(r.get('torch_bf16'), ob)} | {ratio(r.get('torch_f32'), r['ours_f32'])} | "
            f"{r['read_bytes_per_s'] / 1e9:.1f} | {r['floor_s'] / ob['s']:.0%} |")
    lines += ["", "| layer | M | active experts | read GB/s | floor ms | ours bf16 ms | torch int4 loop ms | "
              "torch bf16 loop ms | ours / floor | int4 loop / ours | bf16 loop / ours |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["moe"]:
        ob = r["ours_bf16"]
        lines.append(f"| {r['case'][4:]} | {r['m']} | {r['active_experts']:.1f} | {r['read_bytes_per_s'] / 1e9:.1f} | "
                     f"{r['floor_s'] * 1e3:.3f} | {fmt_ms(ob)} | "
                     f"{fmt_ms(r['torch_int4'])} | {fmt_ms(r['torch_bf16'])} | {ob['s'] / r['floor_s']:.2f} | "
                     f"{ratio(r['torch_int4'], ob)} | {ratio(r['torch_bf16'], ob)} |")
    if "one_thread" in res:
        one = res["one_thread"]
        lines += ["", f"Threads (read bandwidth with one thread {one['machine']['read']['bytes_per_s'] / 1e9:.1f} GB/s):",
                  "", "| case | M | ours bf16 1 thread ms | 2 threads ms | speedup | torch int4 1 thread ms | 2 threads ms |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        two = {(r["case"], r["m"]): r for r in res["experts"] + res["moe"]}
        for r in one["experts"] + one["moe"]:
            t = two.get((r["case"], r["m"]))
            if t is None:
                continue
            lines.append(f"| {r['case']} | {r['m']} | {fmt_ms(r['ours_bf16'])} | {fmt_ms(t['ours_bf16'])} | "
                         f"{ratio(r['ours_bf16'], t['ours_bf16'])} | {fmt_ms(r['torch_int4'])} | {fmt_ms(t['torch_int4'])} |")
    c = res.get("concurrency")
    if c:
        lines += ["", f"Two Python threads calling at once ({c['calls']} decode calls, 4096 x 28672): "
                      f"{c['two_threads_s'] * 1e3:.1f} ms, one after another {c['serial_s'] * 1e3:.1f} ms."]
    spreads = [(r[k]["max"] - r[k]["min"]) / r[k]["s"] for r in res["experts"] + res["moe"] for k in ("ours_bf16",)]
    lines += ["", f"Spread of ferrum-moe's repeats (max - min over the median): median {statistics.median(spreads):.0%}, "
                  f"worst {max(spreads):.0%}."]
    return "\n".join(lines)


def plot(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["case"], r["k"], r["n"]) for r in res["experts"]}, key=lambda c: c[1] * c[2])
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4.5), squeeze=False)
    for ax, (case, k, n) in zip(axes[0], cases):
        rs = [r for r in res["experts"] if r["case"] == case]
        ms = [r["m"] for r in rs]
        for key, label, style in (("ours_bf16", "ferrum-moe bf16", "o-"), ("ours_f32", "ferrum-moe fp32", "s-"),
                                  ("torch_int4", "torch int4", "^--"), ("torch_bf16", "torch bf16 dense", "v--"),
                                  ("torch_f32", "torch fp32 dense", "x--")):
            if key in rs[0]:
                ax.plot(ms, [r[key]["s"] * 1e3 for r in rs], style, label=label)
        ax.plot(ms, [r["floor_s"] * 1e3 for r in rs], "k:", label="memory roof (INT4 bytes / read BW)")
        ax.plot(ms, [r["roof_bf16_s"] * 1e3 for r in rs], "k-.", label="compute roof (peak vdpbf16ps)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("ms")
        ax.set_title(f"{case}: {k} x {n}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"ferrum-moe CPU vs PyTorch, {m['cpu']}, {m['threads']} threads, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    parser.add_argument("--one-thread", action="store_true", help="(internal) the single-thread subset")
    args = parser.parse_args()
    threads = 1 if args.one_thread else int(os.environ.get("FERRUM_MOE_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    machine = Machine(threads)
    read = machine.read_bandwidth()
    peak_bf16, peak_f32 = machine.peak(1), machine.peak(0)
    (cpu,) = [b for b in fm.backends() if b.name == "cpu"]
    res = dict(backend=cpu.description, machine=dict(
        cpu=cpu_model(), threads=threads, date=datetime.date.today().isoformat(), torch=torch.__version__, read=read,
        peak_bf16=peak_bf16, peak_f32=peak_f32, load_before=os.getloadavg()))
    res["machine"]["call_overhead_s"] = call_overhead(rng)
    bw, ahead = read["bytes_per_s"], read["prefetch_ahead"]
    print(f"{res['machine']['cpu']}, {threads} threads; ferrum-moe {cpu.description}; read {bw / 1e9:.1f} GB/s "
          f"(prefetch {read['prefetch_ahead']}), peak bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_f32 / 1e9:.0f} GFLOP/s",
          flush=True)
    if args.one_thread:
        res["experts"] = expert_rows(machine, ahead, rng, 4096, 28672, "Mixtral w13", [1, 16, 256], peak_bf16, peak_f32,
                                     peers=False)
        res["moe"] = moe_rows(machine, ahead, rng, "Qwen3-30B-A3B", MODELS["Qwen3-30B-A3B"], [1, 16])
        json.dump(res, sys.stdout)
        return
    res["experts"] = []
    for k, n, name in EXPERTS:
        res["experts"] += expert_rows(machine, ahead, rng, k, n, name, ROWS, peak_bf16, peak_f32)
    res["moe"] = []
    for name, shape in MODELS.items():
        res["moe"] += moe_rows(machine, ahead, rng, name, shape, MOE_ROWS)
    res["concurrency"] = concurrency(rng)
    one = subprocess.run([sys.executable, __file__, "--one-thread"], env=dict(os.environ, FERRUM_MOE_NUM_THREADS="1"),
                         capture_output=True, text=True, check=True)
    res["one_thread"] = json.loads(one.stdout.splitlines()[-1])
    res["machine"]["load_after"] = os.getloadavg()
    print()
    print("\n".join(targets(res)))
    md = markdown(res)
    print()
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n\nTargets:\n\n" + "\n".join(f"- {line}" for line in targets(res)) + "\n")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
