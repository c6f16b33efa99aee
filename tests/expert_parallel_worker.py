"""One rank of the expert-parallel tests (tests/test_expert_parallel.py starts
world_size of these). It reads the cases the test wrote, runs each through
fm.ExpertParallelMoE over a gloo group, and writes what came out (or the error
each rank raised) for the test to compare against single-process references.

    python expert_parallel_worker.py CASE_DIR RANK WORLD_SIZE
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ferrum_moe as fm
from ferrum_moe.testing import NUMPY_DTYPES


def placement(kind: str, num_experts: int, world_size: int) -> fm.Placement:
    if kind == "skewed":  # rank 0 holds all but one expert per other rank
        return fm.Placement([0] * (num_experts - world_size + 1) + list(range(1, world_size)), world_size)
    if kind == "balanced":  # the low ids hot, a slot more per rank than needed: replicas of the hottest
        return fm.Placement.balanced(np.arange(num_experts, 0, -1) ** 2, world_size,
                                     -(-num_experts // world_size) + 1)
    if kind == "everywhere":  # every rank holds every expert: no pair travels
        return fm.Placement([list(range(world_size))] * num_experts, world_size)
    return getattr(fm.Placement, kind)(num_experts, world_size)


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == NUMPY_DTYPES["bfloat16"]:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(NUMPY_DTYPES["bfloat16"])
    return t.numpy()


def run_checkpoint_case(case: dict, rank: int, world_size: int) -> dict:
    """One layer of a checkpoint directory: {"output": layer.forward of this
    rank's tokens, "read": the names of every tensor this rank read}."""
    read = []
    original = fm.checkpoint.Checkpoint.read

    def recording(self, info):
        read.append(info.name)
        return original(self, info)

    fm.checkpoint.Checkpoint.read = recording
    try:
        num_experts = case["num_experts"] - 2 if case.get("bad_rank") == rank else case["num_experts"]
        p = placement(case["placement"][rank], num_experts, world_size)
        layer = fm.load_expert_parallel_layer(case["path"], case["layer"], placement=p)
    except ValueError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        fm.checkpoint.Checkpoint.read = original
    return {"output": to_numpy(layer.forward(to_torch(case["x"][rank]))).copy(), "read": read}


def run_case(case: dict, weights: dict, rank: int, world_size: int) -> dict:
    """{"outputs": [per call], "types": [...], "sends": [per call, the rows
    dispatch sent to each rank (exact sharded exchanges)]} or {"error": message}."""
    if case.get("kind") == "checkpoint":
        return run_checkpoint_case(case, rank, world_size)
    shape = case["shape"]
    p = placement(case["placement"][rank] if isinstance(case["placement"], list) else case["placement"],
                  shape["num_experts"], world_size)
    w13, w2 = weights[shape["name"]]
    mine = p.local_experts(rank)
    if case["drop_expert_on_rank"] == rank:
        mine = mine[:-1]
    stacks = [fm.ExpertStack.from_gptq([w[g] for g in mine], dtype=shape["dtype"]) for w in (w13, w2)]
    try:
        layer = fm.ExpertParallelMoE(*stacks, top_k=shape["top_k"], placement=p, tokens=case["tokens"],
                                     max_tokens=case["max_tokens"], apply_router_weight_on_input=case["on_input"])
    except (ValueError, TypeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    outputs, types, sends = [], [], []
    for i, call in enumerate(case["calls"]):
        x, tw, ids = call["x"][rank], call["topk_weights"][rank], call["topk_ids"][rank]
        if not case["numpy"]:
            x, tw, ids = to_torch(x), to_torch(tw), to_torch(ids)
        if case["tokens"] == "sharded" and case["max_tokens"] is None:  # the rows sent to each rank
            sends.append(layer.dispatch(x, tw, ids).send_rows)
        if i == 0:  # first call into a NaN-poisoned out=, later ones into new arrays
            out = np.full((x.shape[0], shape["hidden"]), np.nan, NUMPY_DTYPES[shape["dtype"]])
            out = out if case["numpy"] else to_torch(out)
            y = layer(x, tw, ids, out=out)
            assert y is out, "a call with out= must return out"
        else:
            y = layer(x, tw, ids)
        types.append(type(y).__module__.split(".")[0])
        outputs.append(to_numpy(y).copy())
    return {"outputs": outputs, "types": types, "sends": sends}


def main() -> None:
    case_dir, rank, world_size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{case_dir / 'store'}", rank=rank, world_size=world_size)
    with open(case_dir / "cases.pkl", "rb") as f:
        cases, weights = pickle.load(f)
    results = {case["name"]: run_case(case, weights, rank, world_size) for case in cases}
    with open(case_dir / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()
    # A gloo worker thread may still be releasing the last collective's tensors,
    # which takes the GIL: during interpreter shutdown that aborts the process
    # (pytorch/pytorch#179291). The results are written; skip the shutdown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
