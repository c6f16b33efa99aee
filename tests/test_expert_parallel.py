"""fm.ExpertParallelMoE and fm.Placement.

The layer runs over gloo in 2 and 4 processes (tests/expert_parallel_worker.py,
one process per rank, one thread each). Whatever the placement, token layout
and exchange mode, the ranks' outputs must be what one process's fm.fused_moe
gives on the same tokens with every expert, and the float64 reference; bad
arguments are refused on every rank with the argument named. Checks that need
no peer run in this process over a one-rank gloo group."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrum_moe as fm
from conftest import NUMPY_DTYPES, REL_TOL, as64, random_activations, random_weight, reference_moe, rel_error
from model_dirs import Quant, base_config, moe_layers, reference_forward, write_model

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
SHAPES = {  # small layers shaped like the models: experts, top_k, and dtypes across the three
    "mixtral": dict(num_experts=8, top_k=2, hidden=128, intermediate=64, group_size=64, dtype="float16"),
    "qwen3": dict(num_experts=32, top_k=8, hidden=128, intermediate=32, group_size=32, dtype="bfloat16"),
    "deepseek": dict(num_experts=14, top_k=6, hidden=64, intermediate=48, group_size=32, dtype="float32"),
}
# The sharded layer runs the same kernels as one process, but its rows meet the
# kernels in other batches and its float32 sums add the ranks' partial sums:
# the output may round differently by about one step of its dtype.
ONE_ROUNDING = {"float32": 1e-6, "float16": 2.0**-10, "bfloat16": 2.0**-7}
WORLD_SIZES = (2, 4)
MAX_TOKENS = 12


def _spec(name, shape="mixtral", placement="contiguous", tokens="sharded", max_tokens=None, counts="random",
          ids="random", numpy=False, drop_expert_on_rank=None, on_input=False):
    return dict(name=name, shape=shape, placement=placement, tokens=tokens, max_tokens=max_tokens, counts=counts,
                ids=ids, numpy=numpy, drop_expert_on_rank=drop_expert_on_rank, on_input=on_input)


def matching_specs() -> list[dict]:
    """Cases whose outputs must match one process's."""
    specs = []
    for shape in SHAPES:
        for placement in ("contiguous", "round_robin", "balanced"):
            for tokens in ("sharded", "replicated"):
                for mode, max_tokens in (("exact", None), ("fixed", MAX_TOKENS)):
                    specs.append(_spec(f"{shape}-{placement}-{tokens}-{mode}", shape, placement, tokens, max_tokens))
    for mode, max_tokens in (("exact", None), ("fixed", MAX_TOKENS)):
        specs += [
            _spec(f"one-rank-gets-every-token-{mode}", max_tokens=max_tokens, ids="rank0-experts"),
            _spec(f"a-rank-has-no-tokens-{mode}", max_tokens=max_tokens, counts="last-rank-empty"),
            _spec(f"no-rank-has-tokens-{mode}", max_tokens=max_tokens, counts="empty"),
            _spec(f"invalid-ids-are-dropped-{mode}", shape="deepseek", max_tokens=max_tokens, ids="with-invalid"),
            _spec(f"replicated-fewer-tokens-than-ranks-{mode}", tokens="replicated", max_tokens=max_tokens,
                  counts="one"),
            _spec(f"rank-0-owns-nearly-every-expert-{mode}", shape="qwen3", placement="skewed", max_tokens=max_tokens),
        ]
    specs.append(_spec("numpy-in-numpy-out", shape="qwen3", numpy=True))
    specs.append(_spec("every-rank-holds-every-expert", shape="deepseek", placement="everywhere"))
    for tokens in ("sharded", "replicated"):
        specs.append(_spec(f"router-weight-on-input-{tokens}", shape="qwen3", placement="balanced", tokens=tokens,
                           on_input=True))
    return specs


def refusal_specs() -> list[dict]:
    """Cases every rank must refuse when building the layer."""
    return [_spec("ranks-disagree-on-placement", placement="per-rank"),
            _spec("a-rank-holds-the-wrong-experts", drop_expert_on_rank=1)]


# Published layouts with a shared expert (Qwen2-MoE's gated), and DeepSeek-V2's group-limited routing.
CHECKPOINTS = {"qwen2_moe": dict(experts=8, top_k=2), "deepseek_v2": dict(experts=8, top_k=2)}


def _placement(kind: str, rank: int) -> str:
    if kind == "per-rank":  # rank 0 differs from the others
        return "contiguous" if rank == 0 else "round_robin"
    return kind


def _routing(rng, m: int, shape: dict, experts) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([rng.choice(experts, shape["top_k"], replace=False) for _ in range(m)], np.int32)
    return ids.reshape(m, shape["top_k"]), rng.random((m, shape["top_k"])).astype(np.float32)


def _draw_calls(spec: dict, rng, world_size: int) -> list[dict]:
    """Two calls on one layer (the second with other counts), each holding
    every rank's inputs."""
    shape = SHAPES[spec["shape"]]
    experts = np.arange(shape["num_experts"])
    if spec["ids"] == "rank0-experts":
        experts = np.array(fm.Placement.contiguous(shape["num_experts"], world_size).local_experts(0))
    calls = []
    for _ in range(2):
        if spec["counts"] == "empty":
            counts = [0] * world_size
        elif spec["tokens"] == "replicated":
            total = 1 if spec["counts"] == "one" else int(rng.integers(world_size, MAX_TOKENS + 1))
            counts = [total] * world_size
        else:
            counts = rng.integers(1, MAX_TOKENS + 1, world_size).tolist()
            if spec["counts"] == "last-rank-empty":
                counts[-1] = 0
        xs, tws, idss = [], [], []
        for r, m in enumerate(counts):
            if spec["tokens"] == "replicated" and r > 0:
                xs.append(xs[0]), tws.append(tws[0]), idss.append(idss[0])
                continue
            ids, tw = _routing(rng, m, shape, experts)
            if spec["ids"] == "with-invalid" and m:
                ids[0, 0], ids[m - 1, -1] = -1, shape["num_experts"]
            xs.append(random_activations(rng, (m, shape["hidden"]), shape["dtype"]))
            tws.append(tw), idss.append(ids)
        calls.append(dict(x=xs, topk_weights=tws, topk_ids=idss))
    return calls


@pytest.fixture(scope="module")
def seed():
    seed = int(os.environ.get("FERRUM_MOE_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed} for the expert-parallel runs")
    return seed


@pytest.fixture(scope="module")
def weights(seed):
    """Every shape's experts, as GPTQ weights (per global expert)."""
    rng = np.random.default_rng(seed)
    return {name: tuple([random_weight(rng, k, n, group_size=s["group_size"], dtype=s["dtype"])
                         for _ in range(s["num_experts"])]
                        for k, n in ((s["hidden"], 2 * s["intermediate"]), (s["intermediate"], s["hidden"])))
            for name, s in SHAPES.items()}


class Runs:
    """Launches world_size workers once per world size over all cases; keeps
    what each rank returned."""

    def __init__(self, tmp_dir: Path, seed: int, weights: dict):
        self.tmp_dir, self.seed, self.weights = tmp_dir, seed, weights
        self.done: dict[int, tuple[dict, list[dict]]] = {}

    def get(self, world_size: int) -> tuple[dict, list[dict]]:
        if world_size not in self.done:
            self.done[world_size] = self._launch(world_size)
        return self.done[world_size]

    def _launch(self, world_size: int):
        rng = np.random.default_rng(self.seed + world_size)
        cases = []
        for spec in matching_specs() + refusal_specs():
            case = dict(spec, shape=dict(SHAPES[spec["shape"]], name=spec["shape"]),
                        calls=_draw_calls(spec, rng, world_size))
            case["placement"] = [_placement(spec["placement"], r) for r in range(world_size)]
            cases.append(case)
        case_dir = self.tmp_dir / f"world{world_size}"
        case_dir.mkdir()
        for model_type, shape in CHECKPOINTS.items():
            config = base_config(model_type, **shape)
            refs = write_model(case_dir / model_type, config, Quant(), rng)
            layer = moe_layers(config)[0]
            for kind in ("contiguous", "round_robin"):
                counts = rng.integers(0, MAX_TOKENS + 1, world_size)
                cases.append(dict(name=f"checkpoint-{model_type}-{kind}", kind="checkpoint", path=str(case_dir /
                                  model_type), layer=layer, num_experts=shape["experts"], placement=[kind] * world_size,
                                  x=[random_activations(rng, (m, config["hidden_size"]), "float16") for m in counts],
                                  config=config, ref=refs[layer]))
        # Rank 1 asks for a placement of too few experts: every rank must refuse.
        cases.append(dict(cases[-1], name="checkpoint-a-rank-with-a-bad-placement", bad_rank=1))
        with open(case_dir / "cases.pkl", "wb") as f:
            pickle.dump(([{k: v for k, v in c.items() if k not in ("config", "ref")} for c in cases], self.weights), f)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, str(WORKER), str(case_dir), str(r), str(world_size)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world_size)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=120)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                logs.append(p.communicate()[0] + "\n(timed out after 120 s)")
        if any(p.returncode for p in procs):
            pytest.fail("expert-parallel workers failed:\n" + "\n".join(
                f"--- rank {r} (exit {p.returncode}):\n{log[-3000:]}" for r, (p, log) in enumerate(zip(procs, logs))))
        results = []
        for r in range(world_size):
            with open(case_dir / f"rank{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return {case["name"]: case for case in cases}, results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, seed, weights) -> Runs:
    return Runs(tmp_path_factory.mktemp("expert_parallel"), seed, weights)


@pytest.mark.parametrize("name", [s["name"] for s in matching_specs()])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_expert_parallel_matches_one_process(runs, weights, world_size, name):
    cases, results = runs.get(world_size)
    case = cases[name]
    shape = case["shape"]
    w13, w2 = weights[shape["name"]]
    s13, s2 = (fm.ExpertStack.from_gptq(list(w), dtype=shape["dtype"]) for w in (w13, w2))
    for r in range(world_size):
        assert "error" not in results[r][name], f"rank {r}: {results[r][name].get('error')}"
        assert results[r][name]["types"] == ["numpy" if case["numpy"] else "torch"] * 2, \
            "results come back as the caller's array type"
    for i, call in enumerate(case["calls"]):
        # The tokens as one process sees them: every rank's (sharded), or the one set (replicated).
        ranks = range(world_size) if case["tokens"] == "sharded" else range(1)
        x, tw, ids = (np.concatenate([call[key][r] for r in ranks]) for key in ("x", "topk_weights", "topk_ids"))
        single = fm.fused_moe(x, s13, s2, tw, ids, apply_router_weight_on_input=case["on_input"])
        ref = reference_moe(x, w13, w2, tw, ids, num_experts=shape["num_experts"], on_input=case["on_input"])
        outputs = [results[r][name]["outputs"][i] for r in range(world_size)]
        got = [np.concatenate(outputs)] if case["tokens"] == "sharded" else outputs
        for y in got:  # replicated: every rank returns every token's output
            assert y.shape == x.shape and y.dtype == NUMPY_DTYPES[shape["dtype"]]
            assert rel_error(y, single) <= ONE_ROUNDING[shape["dtype"]], f"call {i}: differs from one process"
            assert rel_error(y, ref) < REL_TOL[shape["dtype"]], f"call {i}: differs from float64"


def _rows_by_the_rule(placement, rank: int, ids: np.ndarray) -> list[int]:
    """The rows a rank's dispatch sends each rank, by Placement's rule in a plain
    loop: a pair goes to the home rank where it holds the expert, else to
    replica (t + the ranks below this one lacking the expert) % replicas; a
    token once to each rank."""
    rows = [0] * placement.world_size
    for t in range(ids.shape[0]):
        dests = set()
        for g in ids[t].tolist():
            if 0 <= g < placement.num_experts:
                held = placement.replicas[g]
                lacking_below = len([r for r in range(rank) if r not in held])
                dests.add(rank if rank in held else held[(t + lacking_below) % len(held)])
        for d in dests:
            rows[d] += 1
    return rows


@pytest.mark.parametrize("name", [s["name"] for s in matching_specs()
                                  if s["tokens"] == "sharded" and s["max_tokens"] is None])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_each_pair_goes_to_the_rank_the_placement_picks(runs, world_size, name):
    """The split sizes each rank sent, against the rule: with replicas a pair
    is computed once, on its home rank's replica or one chosen by position
    (the outputs matching one process say it is computed exactly once)."""
    from expert_parallel_worker import placement

    cases, results = runs.get(world_size)
    case = cases[name]
    for r in range(world_size):
        p = placement(case["placement"][r], case["shape"]["num_experts"], world_size)
        for i, call in enumerate(case["calls"]):
            assert results[r][name]["sends"][i] == _rows_by_the_rule(p, r, call["topk_ids"][r]), f"rank {r}, call {i}"


@pytest.mark.parametrize("placement", ["contiguous", "round_robin"])
@pytest.mark.parametrize("model_type", list(CHECKPOINTS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_checkpoint_layer_loads_each_ranks_experts_only(runs, world_size, model_type, placement):
    """fm.load_expert_parallel_layer: each rank reads its experts (and the router
    and the shared expert), and layer.forward gives the model's output."""
    cases, results = runs.get(world_size)
    case = cases[f"checkpoint-{model_type}-{placement}"]
    p = getattr(fm.Placement, placement)(case["num_experts"], world_size)
    for r in range(world_size):
        experts_read = {int(name.split(".experts.")[1].split(".")[0])
                        for name in results[r][case["name"]]["read"] if ".experts." in name}
        assert experts_read == set(p.local_experts(r)), f"rank {r} read experts {sorted(experts_read)}"
        assert any(name.endswith(".gate.weight") for name in results[r][case["name"]]["read"]), "the router"
        assert any(".shared_expert" in name for name in results[r][case["name"]]["read"]), "the shared expert"
    x = np.concatenate(case["x"])
    y = np.concatenate([results[r][case["name"]]["output"] for r in range(world_size)])
    single = fm.MoE.from_pretrained(case["path"], case["layer"], progress=False).forward(x)
    assert rel_error(y, single) <= ONE_ROUNDING["float16"]
    assert rel_error(y, reference_forward(case["config"], case["ref"], as64(x))) < REL_TOL["float16"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_rank_that_cannot_load_its_experts_fails_every_rank(runs, world_size):
    cases, results = runs.get(world_size)
    case = cases["checkpoint-a-rank-with-a-bad-placement"]
    own = (f"ValueError: load_expert_parallel_layer: placement must be an fm.Placement of the layer's 8 experts over "
           f"the group's {world_size} ranks; got Placement.round_robin(6, {world_size})")
    assert results[1][case["name"]]["error"] == own
    for r in set(range(world_size)) - {1}:
        assert results[r][case["name"]]["error"] == (f"ValueError: load_expert_parallel_layer: rank 1 could not read "
                                                     f"its experts ({own}), so no rank can run the layer")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_refuses_a_layer_the_ranks_disagree_on(runs, world_size):
    _, results = runs.get(world_size)
    others = ", ".join(f"rank {r}: Placement.round_robin(8, {world_size})" for r in range(1, world_size))
    for r in range(world_size):
        assert results[r]["ranks-disagree-on-placement"]["error"] == (
            f"ValueError: ExpertParallelMoE: the ranks disagree on placement (rank 0: Placement.contiguous(8, "
            f"{world_size}), {others}); every rank must build the layer with the same arguments and expert shapes")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_rank_with_the_wrong_experts_fails_every_rank(runs, world_size):
    _, results = runs.get(world_size)
    local = fm.Placement.contiguous(8, world_size).local_experts(1)
    own = (f"ValueError: ExpertParallelMoE: w13_shard holds {len(local) - 1} experts; Placement.contiguous(8, "
           f"{world_size}) gives rank 1 {len(local)} experts (global ids {local}): load exactly those")
    assert results[1]["a-rank-holds-the-wrong-experts"]["error"] == own
    for r in set(range(world_size)) - {1}:
        assert results[r]["a-rank-holds-the-wrong-experts"]["error"] == (
            f"ValueError: ExpertParallelMoE: rank 1 could not build its part of the layer ({own}), so no rank can "
            "run the layer")


# ---- Placement --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts, world_size", [(8, 2), (8, 4), (14, 4), (5, 5), (7, 3)])
def test_contiguous_placement_gives_each_rank_a_run_of_experts(num_experts, world_size):
    p = fm.Placement.contiguous(num_experts, world_size)
    base, extra = divmod(num_experts, world_size)
    start = 0
    for r in range(world_size):
        size = base + (1 if r < extra else 0)
        assert p.local_experts(r) == list(range(start, start + size))
        expected = [-1] * num_experts
        expected[start:start + size] = range(size)
        assert p.expert_map(r).tolist() == expected and p.expert_map(r).dtype == np.int32
        start += size
    assert start == num_experts


@pytest.mark.parametrize("num_experts, world_size", [(8, 2), (14, 4), (7, 3)])
def test_round_robin_placement_deals_experts_in_turn(num_experts, world_size):
    p = fm.Placement.round_robin(num_experts, world_size)
    for r in range(world_size):
        assert p.local_experts(r) == [g for g in range(num_experts) if g % world_size == r]
        assert p.expert_map(r).tolist() == [g // world_size if g % world_size == r else -1
                                            for g in range(num_experts)]


def test_a_placement_takes_numpy_and_torch_ranks():
    for ranks in (np.array([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]), [np.int32(0), 1, 0, [1]]):
        p = fm.Placement(ranks, 2)
        assert p.replicas == ((0,), (1,), (0,), (1,)) and p.local_experts(1) == [1, 3]


def test_replicas_are_local_experts_of_every_rank_holding_them():
    p = fm.Placement([[1, 0], 1, 0, [0, 1, 2], 2], 3)
    assert p.replicas == ((0, 1), (1,), (0,), (0, 1, 2), (2,))
    assert [p.local_experts(r) for r in range(3)] == [[0, 2, 3], [0, 1, 3], [3, 4]]
    assert [p.expert_map(r).tolist() for r in range(3)] == [[0, -1, 1, 2, -1], [0, 1, -1, 2, -1],
                                                          [-1, -1, -1, 0, 1]]
    assert repr(p) == "Placement(ranks=[[0, 1], 1, 0, [0, 1, 2], 2], world_size=3)"


def _rank_loads(p, load) -> np.ndarray:
    """Each rank's share of the load, a replica taking an even part of its expert's."""
    loads = np.zeros(p.world_size)
    for g, held in enumerate(p.replicas):
        loads[list(held)] += load[g] / len(held)
    return loads


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_balanced_placement_fills_every_rank_and_evens_the_load(rng, world_size):
    for _ in range(20):
        num_experts = int(rng.integers(world_size, 6 * world_size + 2))
        least = -(-num_experts // world_size)
        slots = int(rng.integers(least, min(num_experts, least + 3) + 1))
        load = rng.pareto(1.0, num_experts) * 100 if rng.random() < 0.5 else rng.integers(0, 4, num_experts) * 1.0
        p = fm.Placement.balanced(load, world_size, slots)
        assert [len(p.local_experts(r)) for r in range(world_size)] == [slots] * world_size
        copies = np.array([len(held) for held in p.replicas])
        assert copies.sum() == world_size * slots and copies.min() >= 1
        # The replicas went where they carry the most: no expert with more
        # replicas carries less per replica than another could have with one more.
        share = load / copies
        for g in np.flatnonzero(copies > 1):
            assert load[g] / (copies[g] - 1) >= share[copies < world_size].max(initial=0) - 1e-9
        # Greedy packing's bound: no rank above the mean by more than one replica's share.
        assert _rank_loads(p, load).max() <= load.sum() / world_size + share.max() + 1e-9


def test_balanced_placement_replicates_a_hot_expert_on_every_rank():
    load = np.array([1000.0] + [1.0] * 7)
    p = fm.Placement.balanced(load, 4, 3)  # 12 slots, 4 extra: three go to expert 0
    assert p.replicas[0] == (0, 1, 2, 3)
    assert sorted(len(held) for held in p.replicas[1:]) == [1] * 6 + [2]
    assert _rank_loads(p, load).max() < _rank_loads(fm.Placement.contiguous(8, 4), load).max() / 3


def test_packing_finishes_an_order_the_greedy_alone_cannot():
    """A hand-made order (not balanced's own) where every rank with room holds
    the last expert already: a full rank hands an expert over and takes it."""
    from ferrum_moe.expert_parallel import _pack

    order = [4, 5, 2, 2, 1, 0, 3, 6, 6]
    holds = _pack(order, np.array([1.0, 1.0, 0.0, 0.0, 2.0, 3.0, 1.0]), 3, 3)
    assert holds.sum(0).tolist() == [3, 3, 3]
    assert holds.sum(1).tolist() == np.bincount(order, minlength=7).tolist()


@pytest.mark.parametrize("make, message", [
    (lambda: fm.Placement.balanced([1.0, -1.0], 2), r"Placement.balanced: load\[1\] = -1.0; loads must be finite"),
    (lambda: fm.Placement.balanced([1.0, np.nan], 2), r"Placement.balanced: load\[1\] = nan"),
    (lambda: fm.Placement.balanced([[1.0]], 1), r"Placement.balanced: load must be a non-empty 1-D array"),
    (lambda: fm.Placement.balanced(["a"], 1), r"Placement.balanced: load must be a non-empty 1-D array of numbers"),
    (lambda: fm.Placement.balanced([1.0] * 5, 2, 2), r"experts_per_rank must be an int in \[3, 5\] .*; got 2"),
    (lambda: fm.Placement.balanced([1.0] * 5, 2, 6), r"experts_per_rank must be an int in \[3, 5\] .*; got 6"),
    (lambda: fm.Placement.balanced([1.0] * 3, 4), "Placement.balanced: 3 experts cannot be split over 4 ranks"),
])
def test_balanced_placement_refuses_bad_loads(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: fm.Placement.contiguous(3, 4), "Placement.contiguous: 3 experts cannot be split over 4 ranks"),
    (lambda: fm.Placement.round_robin(0, 2), "Placement.round_robin: num_experts must be a positive int; got 0"),
    (lambda: fm.Placement([0, 1, 2], 2), r"Placement: ranks\[2\] names rank 2; ranks must be in \[0, 2\)"),
    (lambda: fm.Placement([0, [1, 5]], 2), r"Placement: ranks\[1\] names rank 5; ranks must be in \[0, 2\)"),
    (lambda: fm.Placement([0, 0, 2], 3), r"Placement: rank 1 holds no expert \(experts per rank \[2, 0, 1\]\)"),
    (lambda: fm.Placement([[0, 0], 1], 2), r"Placement: ranks\[0\] = \[0, 0\] names a rank twice"),
    (lambda: fm.Placement([[], 1], 2), r"Placement: ranks\[0\] must be a rank or a non-empty list of ranks"),
    (lambda: fm.Placement([True, 1], 2), r"Placement: ranks\[0\] must be a rank or a non-empty list of ranks"),
    (lambda: fm.Placement(np.zeros((2, 2), int), 2), r"Placement: ranks must be a sequence .*shape \[2, 2\]"),
    (lambda: fm.Placement(torch.zeros((2, 2), dtype=torch.int64), 2), r"Placement: ranks must be a sequence"),
    (lambda: fm.Placement([], 2), "Placement: ranks must be a non-empty sequence"),
    (lambda: fm.Placement.contiguous(8, 2).local_experts(2), r"Placement: rank must be an int in \[0, 2\); got 2"),
])
def test_placement_refuses_what_cannot_be_placed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- one rank, in this process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A one-rank gloo group in this process."""
    store = tmp_path_factory.mktemp("one_rank") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def small(rng):
    """A mixtral-like layer on one rank: stacks, inputs and the one-process result."""
    s = SHAPES["mixtral"]
    w13, w2 = ([random_weight(rng, k, n, group_size=64) for _ in range(s["num_experts"])]
               for k, n in ((s["hidden"], 2 * s["intermediate"]), (s["intermediate"], s["hidden"])))
    stacks = (fm.ExpertStack.from_gptq(w13), fm.ExpertStack.from_gptq(w2))
    x = torch.from_numpy(random_activations(rng, (9, s["hidden"]), "float16"))
    ids, tw = (torch.from_numpy(a) for a in _routing(rng, 9, s, np.arange(s["num_experts"])))
    return stacks, x, tw, ids, fm.fused_moe(x, *stacks, tw, ids)


class HostReads(torch.overrides.TorchFunctionMode):
    """Records the torch calls that read a tensor's values on the host (each a
    device synchronisation on a GPU) and the split sizes of every all-to-all."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu",
             "masked_select", "unique"}

    def __init__(self):
        super().__init__()
        self.reads, self.splits = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        if name == "all_to_all_single":
            self.splits.append((args[2] if len(args) > 2 else kwargs.get("output_split_sizes"),
                                args[3] if len(args) > 3 else kwargs.get("input_split_sizes")))
        return func(*args, **kwargs)


def test_fixed_capacity_reads_nothing_on_the_host(one_rank, small):
    """What CUDA graph capture needs: no value read back, equal splits."""
    stacks, x, tw, ids, single = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1), max_tokens=16)
    out = torch.full_like(x, float("nan"))
    with HostReads() as fixed:
        layer(x, tw, ids, out=out)
    assert fixed.reads == [] and fixed.splits == [(None, None), (None, None)]
    assert rel_error(out, single) <= ONE_ROUNDING["float16"]
    exact = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1))
    with HostReads() as exchange:
        exact(x, tw, ids)
    assert exchange.reads == ["tolist", "tolist"], "the exact exchange reads its split sizes once"
    assert exchange.splits == [(None, None), ([9], [9]), ([9], [9])], \
        "split sizes first (equal splits), then the rows, then the partial sums"


def test_unused_fixed_capacity_slots_carry_no_pairs(one_rank, small):
    """Slots no token filled reach align with ids -1, so no block is scheduled for them."""
    stacks, x, tw, ids, _ = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1), max_tokens=16)
    dispatched = layer.dispatch(x, tw, ids)
    assert dispatched.topk_ids.shape == (16, 2)
    assert torch.equal(dispatched.topk_ids[:9], ids) and bool((dispatched.topk_ids[9:] == -1).all())
    assert bool((layer.compute(dispatched)[9:] == 0).all())


def test_int64_ids_past_int32_are_dropped_not_wrapped(one_rank, small):
    """The rows carry int32 ids: 2**32 + e must not arrive as expert e."""
    stacks, x, tw, ids, _ = small
    wide = ids.long()
    wide[0, 0] += 2**32
    wide[5, 1] = -(2**32) + 3
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1))
    dropped = ids.clone()
    dropped[0, 0] = dropped[5, 1] = -1
    assert rel_error(layer(x, tw, wide), fm.fused_moe(x, *stacks, tw, dropped)) <= ONE_ROUNDING["float16"]


def test_phases_compose_to_the_layer(one_rank, small):
    stacks, x, tw, ids, single = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.round_robin(8, 1))
    dispatched = layer.dispatch(x, tw, ids)
    partial = layer.compute(dispatched)
    assert partial.dtype == torch.float32 and partial.shape == (9, 128), "partial sums stay float32"
    assert rel_error(layer.combine(dispatched, partial), single) <= ONE_ROUNDING["float16"]


def _layer_error(stacks, **kwargs):
    args = dict(top_k=2, placement=fm.Placement.contiguous(8, 1))
    args.update(kwargs)
    return fm.ExpertParallelMoE(*stacks, **args)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(placement=fm.Placement.contiguous(8, 2)), ValueError,
     r"placement is over 2 ranks; the group has 1: build it with world_size=1"),
    (dict(placement="contiguous"), TypeError, r"placement must be an fm.Placement .*; got str"),
    (dict(top_k=9), ValueError, r"top_k must be an int in \[1, 8\] \(the global expert count\); got 9"),
    (dict(top_k=0), ValueError, r"top_k must be an int in \[1, 8\]"),
    (dict(tokens="split"), ValueError, r"tokens must be one of \('sharded', 'replicated'\); got 'split'"),
    (dict(max_tokens=0), ValueError, r"max_tokens must be None or a positive int; got 0"),
    (dict(apply_router_weight_on_input="yes"), TypeError, r"apply_router_weight_on_input must be a bool; got str"),
])
def test_bad_layer_arguments_are_refused(one_rank, small, kwargs, error, message):
    with pytest.raises(error, match="ExpertParallelMoE: " + message):
        _layer_error(small[0], **kwargs)


def test_stacks_that_do_not_match_the_placement_are_refused(one_rank, small):
    (s13, s2), _, _, _, _ = small
    with pytest.raises(ValueError, match=r"w2_shard holds 8 experts; Placement.contiguous\(9, 1\) gives rank 0 9 "
                                         r"experts \(global ids \[0, 1, 2, 3\] \.\.\. \[7, 8\]\)"):
        fm.ExpertParallelMoE(fm.ExpertStack.from_gptq([random_weight(np.random.default_rng(0), 128, 128,
                                                                     group_size=64)] * 9), s2, top_k=2,
                             placement=fm.Placement.contiguous(9, 1))
    with pytest.raises(TypeError, match="w13_shard must be an fm.ExpertStack; got list"):
        fm.ExpertParallelMoE([s13], s2, top_k=2, placement=fm.Placement.contiguous(8, 1))


@pytest.mark.parametrize("change, message", [
    (lambda x, tw, ids: (x[:, :64], tw, ids), r"x must be \[num_tokens, hidden=128\]; got shape \[9, 64\]"),
    (lambda x, tw, ids: (x.float(), tw, ids), r"x is torch.float32; the experts compute in float16"),
    (lambda x, tw, ids: (x, tw, ids[:, :1]), r"topk_ids must be \[num_tokens=9, top_k=2\]; got shape \[9, 1\]"),
    (lambda x, tw, ids: (x, tw[:8], ids), r"topk_weights must be \[num_tokens=9, top_k=2\]; got shape \[8, 2\]"),
    (lambda x, tw, ids: (x, tw.double(), ids), r"topk_weights must be float32; got torch.float64"),
    (lambda x, tw, ids: (x, tw, ids.float()), r"topk_ids must be int32 or int64; got torch.float32"),
    (lambda x, tw, ids: (x, tw, [[0, 1]] * 9), r"topk_ids: expected an array with __dlpack__"),
])
def test_bad_inputs_are_refused(one_rank, small, change, message):
    stacks, x, tw, ids, _ = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1))
    with pytest.raises((ValueError, TypeError), match=message):
        layer(*change(x, tw, ids))


@pytest.mark.parametrize("tokens, message", [
    ("sharded", r"dispatch got 9 tokens; this layer sends at most 8 per rank \(max_tokens=8, tokens='sharded'\)"),
    ("replicated", r"x has 9 tokens; this layer was built with max_tokens=8"),
])
def test_more_tokens_than_the_fixed_capacity_are_refused(one_rank, small, tokens, message):
    stacks, x, tw, ids, _ = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1), tokens=tokens,
                                 max_tokens=8)
    with pytest.raises(ValueError, match=message):
        layer(x, tw, ids)


def test_an_out_of_the_wrong_shape_is_refused(one_rank, small):
    stacks, x, tw, ids, _ = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1))
    with pytest.raises(ValueError, match=r"out must be \[num_tokens=9, hidden=128\] float16; got shape \[9, 128\], "
                                         r"torch.float32"):
        layer(x, tw, ids, out=torch.empty(9, 128))


def test_route_needs_a_router(one_rank, small):
    stacks, x, _, _, _ = small
    layer = fm.ExpertParallelMoE(*stacks, top_k=2, placement=fm.Placement.contiguous(8, 1))
    with pytest.raises(ValueError, match=r"ExpertParallelMoE.route: this layer has no router \(only layers from "
                                         r"fm.load_expert_parallel_layer have one\)"):
        layer.forward(x)


def test_a_placement_that_does_not_fit_the_checkpoint_is_refused(one_rank, tmp_path, rng):
    write_model(tmp_path, base_config("mixtral", experts=8), Quant(), rng)
    with pytest.raises(ValueError, match=r"load_expert_parallel_layer: placement must be an fm.Placement of the "
                                         r"layer's 8 experts over the group's 1 ranks; got Placement.contiguous\(6, 1\)"):
        fm.load_expert_parallel_layer(tmp_path, 0, placement=fm.Placement.contiguous(6, 1))
    with pytest.raises(ValueError, match="layer 7 does not exist: .*config.json has num_hidden_layers 2"):
        fm.load_expert_parallel_layer(tmp_path, 7)


def test_a_layer_needs_torch_distributed_initialized(small, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized: call "
                                           "torch.distributed.init_process_group first"):
        _layer_error(small[0])


@pytest.mark.parametrize("placement", ["contiguous", "balanced"])
def test_the_example_runs_under_torchrun(placement):
    """examples/expert_parallel.py in 2 processes: each rank checks its tokens against float64."""
    example = Path(__file__).parents[1] / "examples" / "expert_parallel.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(example), "--experts", "8", "--top-k", "2", "--hidden", "128", "--intermediate", "64",
                          "--tokens", "5", "--max-tokens", "8", "--placement", placement],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = sorted(line for line in run.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":")[0] for line in lines] == ["rank 0/2 (cpu)", "rank 1/2 (cpu)"]
    assert all(line.endswith("(ok)") for line in lines), lines
