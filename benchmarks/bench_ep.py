"""Expert-parallel benchmark: one MoE layer on 1 process vs split over
--world-size processes (gloo on the CPU, or NCCL with --device cuda, one GPU per
process), with each rank's time split into dispatch, compute and combine.

    python benchmarks/bench_ep.py [--world-size 2] [--tokens 1 64 1024] [--json out.json]
        [--skew 1.0 --placements contiguous balanced --extra-slots 8]

"1 process" runs fm.MoE with every expert on world_size x M tokens, using all
--threads cores; "N processes" runs fm.ExpertParallelMoE with M tokens per rank,
threads split evenly between the ranks. So on the CPU both use the same cores,
and the ratio of their tokens/s is the cost of the exchange, not a speed-up.
The phase times come from calls with a barrier between the phases (each phase's
own cost, on the slowest rank); the total from calls without. Every time is the
best of several calls: on a shared machine, other work only ever adds time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v2-lite": (64, 6, 2048, 1408)}  # E, top_k, hidden, inter


def repeats_for(num_tokens: int) -> int:
    return 7 if num_tokens <= 256 else 3


def layer_inputs(torch, seed: int, m: int, num_experts: int, top_k: int, hidden: int, device, skew: float = 0.0):
    """m tokens routed by random logits (top-k, renormalized). skew > 0 makes
    some experts popular: expert g's logits gain skew * log(1 / (1 + its place
    in a fixed random order)), a Zipf-like preference, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, hidden, generator=gen).half()
    logits = torch.randn(m, num_experts, generator=gen)
    if skew:
        place = torch.randperm(num_experts, generator=torch.Generator().manual_seed(12345))
        logits -= skew * torch.log1p(place.float())
    weights, ids = torch.softmax(logits, -1).topk(top_k, -1)
    return x.to(device), (weights / weights.sum(-1, keepdim=True)).to(device), ids.int().to(device)


def make_placement(args, torch, dist, num_experts: int, top_k: int, hidden: int):
    """args.placement over the group; "balanced" from the pair counts of a
    calibration batch of 1024 tokens per rank (summed over the ranks, as a
    serving engine would count them), with --extra-slots more slots a rank."""
    import ferrum_moe as fm

    if args.placement == "contiguous":
        return fm.Placement.contiguous(num_experts, args.world_size)
    _, _, ids = layer_inputs(torch, 7919 + args.rank, 1024, num_experts, top_k, hidden, "cpu", args.skew)
    load = torch.bincount(ids.flatten().long(), minlength=num_experts).to(args.device)
    dist.all_reduce(load)  # on the group's device: NCCL reduces CUDA tensors only
    slots = -(-num_experts // args.world_size) + args.extra_slots
    return fm.Placement.balanced(load.cpu().numpy(), args.world_size, min(slots, num_experts))


def stacks(experts, hidden: int, inter: int, device):
    import numpy as np

    import ferrum_moe as fm
    from ferrum_moe.testing import random_codes_weight

    rng = np.random.default_rng(len(experts))
    return (fm.ExpertStack.from_gptq([random_codes_weight(rng, hidden, 2 * inter) for _ in experts], device=device),
            fm.ExpertStack.from_gptq([random_codes_weight(rng, inter, hidden) for _ in experts], device=device))


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_single(args) -> dict:
    """fm.MoE with every expert on world_size x M tokens."""
    import torch

    import ferrum_moe as fm

    e, top_k, hidden, inter = MODELS[args.model]
    layer = fm.MoE(*stacks(range(e), hidden, inter, args.device), top_k=top_k)
    rows = {}
    for m in args.tokens:
        x, tw, ids = layer_inputs(torch, m, args.world_size * m, e, top_k, hidden, args.device, args.skew)
        layer(x, tw, ids)
        times = []
        for _ in range(repeats_for(m)):
            sync(torch, args.device)
            start = time.perf_counter()
            layer(x, tw, ids)
            sync(torch, args.device)
            times.append(time.perf_counter() - start)
        rows[m] = dict(total=min(times))
    return rows


def run_rank(args) -> dict:
    """One rank of fm.ExpertParallelMoE with M tokens on every rank."""
    import torch
    import torch.distributed as dist

    import ferrum_moe as fm

    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.rank)
        args.device = f"cuda:{args.rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                            init_method=f"file://{args.store}", rank=args.rank, world_size=args.world_size)
    e, top_k, hidden, inter = MODELS[args.model]
    placement = make_placement(args, torch, dist, e, top_k, hidden)
    layer = fm.ExpertParallelMoE(*stacks(placement.local_experts(args.rank), hidden, inter, args.device),
                                 top_k=top_k, placement=placement)
    rows = {}
    for m in args.tokens:
        x, tw, ids = layer_inputs(torch, 1000 * m + args.rank, m, e, top_k, hidden, args.device, args.skew)
        pairs = int((layer.dispatch(x, tw, ids).topk_ids >= 0).sum())  # the pairs this rank computes
        layer(x, tw, ids)
        phases = {"dispatch": [], "compute": [], "combine": []}
        for _ in range(repeats_for(m)):
            marks = []
            for phase in phases:
                sync(torch, args.device)
                dist.barrier()
                marks.append(time.perf_counter())
                if phase == "dispatch":
                    dispatched = layer.dispatch(x, tw, ids)
                elif phase == "compute":
                    partial = layer.compute(dispatched)
                else:
                    layer.combine(dispatched, partial)
                sync(torch, args.device)
                phases[phase].append(time.perf_counter() - marks[-1])
        totals = []
        for _ in range(repeats_for(m)):
            sync(torch, args.device)
            dist.barrier()
            start = time.perf_counter()
            layer(x, tw, ids)
            sync(torch, args.device)
            totals.append(time.perf_counter() - start)
        mine = dict({p: min(t) for p, t in phases.items()}, total=min(totals))
        every = [None] * args.world_size
        dist.all_gather_object(every, dict(mine, pairs=pairs))
        rows[m] = {key: max(r[key] for r in every) for key in mine}  # the slowest rank sets the pace
        rows[m].update(compute_fastest=min(r["compute"] for r in every), pairs=[r["pairs"] for r in every])
    dist.destroy_process_group()
    return rows


def launch(args, role: str, threads: int, rank: int = 0, store: str = "") -> subprocess.Popen:
    out = Path(args.scratch) / f"{role}{rank}.json"
    cmd = [sys.executable, __file__, "--role", role, "--model", args.model, "--device", args.device,
           "--world-size", str(args.world_size), "--rank", str(rank), "--store", store, "--out", str(out),
           "--tokens", *map(str, args.tokens)]
    cmd += ["--skew", str(args.skew), "--placement", args.placement, "--extra-slots", str(args.extra_slots)]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads), NCCL_NVLS_ENABLE="0"))


def collect(args, procs, role: str) -> dict:
    for p in procs:
        if p.wait():
            raise SystemExit(f"a {role} process failed (exit {p.returncode})")
    with open(Path(args.scratch) / f"{role}0.json") as f:
        return {int(m): row for m, row in json.load(f).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024], help="tokens per rank")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (rank r on cuda:r)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="Zipf-like expert popularity (0: uniform random routing)")
    parser.add_argument("--placements", nargs="+", default=["contiguous"], choices=("contiguous", "balanced"),
                        help="expert placements to run (balanced: from a calibration batch's pair counts)")
    parser.add_argument("--extra-slots", type=int, default=0,
                        help="balanced: slots per rank past ceil(experts / world size), for replicas")
    parser.add_argument("--json")
    parser.add_argument("--placement", default="contiguous", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=("main", "single", "rank"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role != "main":
        rows = run_single(args) if args.role == "single" else run_rank(args)
        if args.rank == 0:
            with open(args.out, "w") as f:
                json.dump(rows, f)
        # A gloo worker thread may still be releasing the last collective's
        # tensors, which takes the GIL: during interpreter shutdown that aborts
        # the process (pytorch/pytorch#179291). The results are written.
        sys.stdout.flush()
        os._exit(0)

    n = args.world_size
    load_before = os.getloadavg()
    print(f"{n} processes x {max(args.threads // n, 1)} threads vs 1 process x {args.threads} threads, "
          f"device {args.device}, routing skew {args.skew}; tokens/s counts every rank's tokens; compute: the "
          "slowest rank (the fastest's in brackets); pairs: those each rank computes")
    print(f"{'model':<18} {'M/rank':>6} {'procs':>5} {'placement':<10} {'dispatch ms':>11} {'compute ms':>18} "
          f"{'combine ms':>10} {'total ms':>9} {'tokens/s':>9} {'vs 1 proc':>9}  pairs")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = scratch
        for model in args.models:
            args.model = model
            single = collect(args, [launch(args, "single", args.threads)], "single")
            by_placement = {}
            for placement in args.placements:
                args.placement = placement
                store = str(Path(scratch) / f"store-{model}-{placement}")
                by_placement[placement] = collect(
                    args, [launch(args, "rank", max(args.threads // n, 1), r, store) for r in range(n)], "rank")
            for m in args.tokens:
                one = single[m]
                rate1 = n * m / one["total"]
                print(f"{model:<18} {m:>6} {1:>5} {'':<10} {'':>11} {one['total'] * 1e3:>18.2f} {'':>10} "
                      f"{one['total'] * 1e3:>9.2f} {rate1:>9.0f} {'':>9}")
                for placement, ranks in by_placement.items():
                    many = ranks[m]
                    rate_n = n * m / many["total"]
                    compute = f"{many['compute'] * 1e3:.2f} ({many['compute_fastest'] * 1e3:.2f})"
                    print(f"{model:<18} {m:>6} {n:>5} {placement:<10} {many['dispatch'] * 1e3:>11.2f} {compute:>18} "
                          f"{many['combine'] * 1e3:>10.2f} {many['total'] * 1e3:>9.2f} {rate_n:>9.0f} "
                          f"{rate_n / rate1:>8.2f}x  {many['pairs']}", flush=True)
                    results.append(dict(model=model, tokens_per_rank=m, world_size=n, placement=placement,
                                        skew=args.skew, single=one, expert_parallel=many, tokens_per_s_single=rate1,
                                        tokens_per_s_expert_parallel=rate_n))
    load = dict(before=load_before, after=os.getloadavg())
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, threads=args.threads, world_size=n, load_average=load, rows=results), f,
                      indent=1)


if __name__ == "__main__":
    main()
