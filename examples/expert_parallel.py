"""One MoE layer with its experts split over the processes torchrun starts:
gloo on CPUs, NCCL on GPUs (one GPU per process).

    torchrun --standalone --nproc-per-node 2 examples/expert_parallel.py                  # CPUs, gloo
    torchrun --standalone --nproc-per-node 2 examples/expert_parallel.py --device cuda    # GPUs, NCCL

Each rank makes only its own experts (here quantized from random floats, seeded
per expert; in a model, read from the checkpoint), routes its own tokens with
the router, runs the layer, and checks its tokens against a float64 reference
computed from every expert's dequantized weights. The GPU path (NCCL, and
--cuda-graph) has not run yet: no machine with two GPUs has been available.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import ferrum_moe as fm
from ferrum_moe.testing import REL_TOL, random_weight, reference_moe, rel_error


def expert_weights(seed: int, g: int, hidden: int, intermediate: int):
    """Global expert g's (w13, w2), the same on every rank that asks."""
    rng = np.random.default_rng([seed, g])
    return (random_weight(rng, hidden, 2 * intermediate, group_size=64),
            random_weight(rng, intermediate, hidden, group_size=64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per rank")
    parser.add_argument("--placement", choices=("contiguous", "round_robin", "balanced"), default="contiguous",
                        help="balanced: from the router's pair counts on a calibration batch, a slot more a rank")
    parser.add_argument("--max-tokens", type=int, help="fixed-capacity exchange (no host reads; capturable)")
    parser.add_argument("--cuda-graph", action="store_true", help="capture the layer in a CUDA graph and replay it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cuda_graph and (args.device != "cuda" or args.max_tokens is None):
        parser.error("--cuda-graph needs --device cuda and --max-tokens (a graph cannot replay host-read split sizes)")

    if args.device == "cuda":
        # NVLink multicast (NVLS) can take a host's GPUs out of service on the lent machines.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    gate = torch.randn(args.hidden, args.experts, generator=torch.Generator().manual_seed(args.seed)) / 16

    def route(x):
        topk_weights, topk_ids = torch.softmax(x.float() @ gate, dim=-1).topk(args.top_k, dim=-1)
        return topk_weights / topk_weights.sum(-1, keepdim=True), topk_ids.int()

    if args.placement == "balanced":
        # Count the pairs the router gives each expert on a calibration batch,
        # over every rank, and replicate the busiest (one slot more a rank).
        calibration = torch.randn(256, args.hidden, generator=torch.Generator().manual_seed(args.seed * 1000 + 999 -
                                                                                           rank))
        load = torch.bincount(route(calibration)[1].flatten().long(), minlength=args.experts).to(device)
        dist.all_reduce(load)  # on the group's device: NCCL reduces CUDA tensors only
        placement = fm.Placement.balanced(load.cpu().numpy(), world_size, min(-(-args.experts // world_size) + 1,
                                                                        args.experts))
    else:
        placement = getattr(fm.Placement, args.placement)(args.experts, world_size)
    mine = placement.local_experts(rank)
    local = [expert_weights(args.seed, g, args.hidden, args.intermediate) for g in mine]
    w13 = fm.ExpertStack.from_gptq([w for w, _ in local], device=device, dtype="float16")
    w2 = fm.ExpertStack.from_gptq([w for _, w in local], device=device, dtype="float16")
    layer = fm.ExpertParallelMoE(w13, w2, top_k=args.top_k, placement=placement, max_tokens=args.max_tokens)

    # This rank's tokens and the router's choice for them.
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).half()
    topk_weights, topk_ids = route(x)
    x, topk_weights, topk_ids = (t.to(device) for t in (x, topk_weights, topk_ids))

    def run():
        return layer(x, topk_weights, topk_ids)

    run()
    if args.cuda_graph:
        out = torch.empty(args.tokens, args.hidden, dtype=torch.float16, device=device)
        # fm.MoE keeps its buffers per stream: warm up on the stream the capture records.
        capture_stream = torch.cuda.Stream()
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture_stream):
            layer(x, topk_weights, topk_ids, out=out)
        torch.cuda.current_stream().wait_stream(capture_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            layer(x, topk_weights, topk_ids, out=out)

        def run():
            graph.replay()
            return out

    dist.barrier()
    start = time.perf_counter()
    for _ in range(5):
        y = run()
    if args.device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 5 * 1e3

    # The check needs every expert: regenerated here (seeded per expert), as a reference only.
    everything = [expert_weights(args.seed, g, args.hidden, args.intermediate) for g in range(args.experts)]
    ref = reference_moe(x.cpu(), [w for w, _ in everything], [w for _, w in everything], topk_weights.cpu(),
                        topk_ids.cpu())
    err = rel_error(y.cpu(), ref)
    ok = err < REL_TOL["float16"]
    # One write per line: the ranks share a terminal, and unbuffered print() writes the newline apart.
    sys.stdout.write(f"rank {rank}/{world_size} ({device}): experts {mine}, {args.tokens} tokens, {ms:.2f} ms per "
                     f"layer, relative error vs float64 {err:.1e} ({'ok' if ok else 'FAILED'})\n")
    sys.stdout.flush()
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
