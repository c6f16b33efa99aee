"""Expert parallelism: one MoE layer's experts split over the ranks of a
torch.distributed process group (NCCL on GPUs, gloo on CPUs), with tokens
exchanged by ``all_to_all_single`` around an unchanged local layer (fm.MoE with
an ``expert_map``).

One forward, on every rank of the group at once:

  dispatch  each pair picks the rank that computes it (its expert's only rank,
            or for a replicated expert the home rank's own replica, else one
            by the pair's position); each home token goes once to every rank
            picked for one of its pairs, as one packed row [hidden state |
            router weights | global expert ids; with replicas, -1 for the
            pairs that rank does not compute] (the split sizes first, then
            the rows);
  compute   that rank runs its local experts over the rows it received (-1
            pairs and other ranks' experts are dropped by expert_map inside
            align), and its partial top-k sum comes out in float32;
  combine   the partial sums travel back by the reverse all-to-all and the home
            rank adds them in float32, rounding once to the layer's dtype.

docs/expert-parallel.md describes the protocol, the placement and the CUDA
graph rules.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .arrays import import_array, to_caller
from .moe import MoE
from .stack import ExpertStack

TOKENS = ("sharded", "replicated")


class Placement:
    """Which ranks hold each of ``num_experts`` global experts: one rank, or
    several for a replicated expert (a hot one, so its pairs spread over more
    ranks). A pair routed to a replicated expert is computed by exactly one of
    its replicas: the home rank's own where it holds one (the pair never
    travels), else replica ``(t + h) % replicas`` for home token t, where h
    counts the ranks below the home rank that lack the expert (so the ranks
    that lack it take turns over its replicas, and each rank's tokens too). A
    rank's local expert ids follow global order: local id i is the i-th global
    expert it holds.

    ranks: per global expert, a rank in [0, world_size), or a non-empty
    sequence of distinct ranks (its replicas). Every rank must hold at least
    one expert (a backend cannot hold an empty stack).
    """

    def __init__(self, ranks, world_size: int):
        if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"Placement: world_size must be a positive int; got {world_size!r}")
        if hasattr(ranks, "tolist") and not isinstance(ranks, (list, tuple)):  # numpy, PyTorch, ...
            if len(getattr(ranks, "shape", ())) != 1:
                raise ValueError(f"Placement: ranks must be a sequence (a rank or a list of ranks per global expert); "
                                 f"got an array of shape {list(getattr(ranks, 'shape', ()))}")
            ranks = ranks.tolist()
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__") or len(ranks) == 0:
            raise ValueError("Placement: ranks must be a non-empty sequence (a rank or a list of ranks per global "
                             f"expert); got {ranks!r}")
        replicas = []
        for g, held in enumerate(ranks):
            held = [held] if _is_int(held) else held
            if isinstance(held, (str, bytes)) or not hasattr(held, "__len__") or len(held) == 0 or \
                    not all(_is_int(r) for r in held):
                raise ValueError(f"Placement: ranks[{g}] must be a rank or a non-empty list of ranks; got {held!r}")
            bad = [int(r) for r in held if not 0 <= r < world_size]
            if bad:
                raise ValueError(f"Placement: ranks[{g}] names rank {bad[0]}; ranks must be in [0, {world_size})")
            if len(set(int(r) for r in held)) != len(held):
                raise ValueError(f"Placement: ranks[{g}] = {[int(r) for r in held]} names a rank twice; a rank "
                                 "holds at most one replica of an expert")
            replicas.append(tuple(sorted(int(r) for r in held)))
        self.replicas: tuple[tuple[int, ...], ...] = tuple(replicas)
        self.world_size = int(world_size)
        # holds[g, r]: rank r holds expert g.
        self._holds = np.zeros((len(replicas), self.world_size), bool)
        for g, held in enumerate(replicas):
            self._holds[g, list(held)] = True
        counts = self._holds.sum(0)
        if not counts.all():
            raise ValueError(f"Placement: rank {int(np.argmin(counts))} holds no expert (experts per rank "
                             f"{counts.tolist()}); every rank must hold at least one")
        self._kind = None  # the constructor that made it, for repr

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "Placement":
        """Rank r holds a contiguous run of global ids; the first num_experts %
        world_size ranks hold one more (as vLLM places experts)."""
        _check_counts(num_experts, world_size, "contiguous")
        base, extra = divmod(num_experts, world_size)
        sizes = [base + (r < extra) for r in range(world_size)]
        placement = cls(np.repeat(np.arange(world_size), sizes), world_size)
        placement._kind = f"contiguous({num_experts}, {world_size})"
        return placement

    @classmethod
    def round_robin(cls, num_experts: int, world_size: int) -> "Placement":
        """Global expert g lives on rank g % world_size."""
        _check_counts(num_experts, world_size, "round_robin")
        placement = cls(np.arange(num_experts) % world_size, world_size)
        placement._kind = f"round_robin({num_experts}, {world_size})"
        return placement

    @classmethod
    def balanced(cls, load, world_size: int, experts_per_rank: int | None = None) -> "Placement":
        """Every rank holds ``experts_per_rank`` experts, and the ranks' shares of
        ``load`` come out as even as a greedy packing makes them.

        load: per global expert, how much of the routing it gets (pair counts
        from a run, e.g. ``torch.bincount(topk_ids.flatten(), minlength=E)``
        summed over ranks, or expected shares): non-negative and finite.
        experts_per_rank: slots per rank, in [ceil(E / world_size), E]
        (default the least). The slots past one per expert go to replicas,
        each to the expert whose replicas carry the most load each; then the
        replicas, heaviest first, each go to the least-loaded rank with a free
        slot that does not hold that expert yet. A replica is assumed to take
        an even share of its expert's load (what dispatch's rule gives when
        the ranks route alike)."""
        load = np.asarray(load)
        if load.ndim != 1 or load.size == 0 or load.dtype.kind not in "iuf":
            raise ValueError(f"Placement.balanced: load must be a non-empty 1-D array of numbers (one per global "
                             f"expert); got shape {list(load.shape)}, dtype {load.dtype}")
        load = load.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(load) | (load < 0))
        if bad.size:
            raise ValueError(f"Placement.balanced: load[{bad[0]}] = {load[bad[0]]}; loads must be finite and "
                             "non-negative")
        num_experts = load.size
        _check_counts(num_experts, world_size, "balanced")
        least = -(-num_experts // world_size)
        if experts_per_rank is None:
            experts_per_rank = least
        if isinstance(experts_per_rank, bool) or not isinstance(experts_per_rank, (int, np.integer)) or \
                not least <= experts_per_rank <= num_experts:
            raise ValueError(f"Placement.balanced: experts_per_rank must be an int in [{least}, {num_experts}] (every "
                             f"expert placed, no rank with two replicas of one); got {experts_per_rank!r}")
        slots = int(experts_per_rank)

        # How many replicas each expert gets: each further slot to the expert
        # whose replicas would each carry the most (ties: fewer replicas, then
        # the lower id).
        copies = np.ones(num_experts, np.int64)
        for _ in range(world_size * slots - num_experts):
            share = np.where(copies < world_size, load / copies, -1.0)
            best = np.flatnonzero(share == share.max())
            copies[best[np.argmin(copies[best])]] += 1

        share = load / copies
        order = [g for g in sorted(range(num_experts), key=lambda e: (-share[e], e)) for _ in range(copies[g])]
        holds = _pack(order, share, world_size, slots)
        return cls([np.flatnonzero(holds[g]).tolist() for g in range(num_experts)], world_size)

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    def _rank(self, rank) -> int:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise ValueError(f"Placement: rank must be an int in [0, {self.world_size}); got {rank!r}")
        return int(rank)

    def local_experts(self, rank: int) -> list[int]:
        """The global ids ``rank`` holds, in local-id order: the experts to load
        on that rank (fm.ExpertStack.from_gptq([weights[g] for g in ...]))."""
        return np.flatnonzero(self._holds[:, self._rank(rank)]).tolist()

    def expert_map(self, rank: int) -> np.ndarray:
        """int32 [num_experts]: global id -> ``rank``'s local id, or -1 for
        experts it does not hold (fm.fused_moe's expert_map)."""
        mine = self._holds[:, self._rank(rank)]
        return np.where(mine, np.cumsum(mine) - 1, -1).astype(np.int32)

    def __repr__(self) -> str:
        if self._kind is not None:
            return f"Placement.{self._kind}"
        shown = [held[0] if len(held) == 1 else list(held) for held in self.replicas]
        return f"Placement(ranks={shown}, world_size={self.world_size})"


def _pack(order: list[int], share: np.ndarray, world_size: int, slots: int) -> np.ndarray:
    """holds [experts, world_size]: the replicas in ``order`` (expert ids, an
    expert's replicas one after another) each on the least-loaded rank with a
    free slot that does not hold that expert yet (then the one with the most
    room, then the lowest), every rank filling its ``slots``."""
    holds = np.zeros((share.size, world_size), bool)
    rank_load = np.zeros(world_size)
    free = np.full(world_size, slots)
    for g in order:
        open_ = np.flatnonzero((free > 0) & ~holds[g])
        if open_.size:
            r = open_[np.lexsort((open_, -free[open_], rank_load[open_]))[0]]
        else:
            # Every rank with room holds g already (the greedy order has not been
            # seen to come here, but nothing rules it out): the least-loaded full
            # rank q without g hands p, a rank with room, one of its experts that
            # p lacks (there is one: q holds more experts than p), and takes g.
            p = int(np.flatnonzero(free > 0)[0])
            without = np.flatnonzero(~holds[g])
            q = int(without[np.argmin(rank_load[without])])
            movable = np.flatnonzero(holds[:, q] & ~holds[:, p])
            h = int(movable[np.argmin(share[movable])])
            holds[h, q], holds[h, p] = False, True
            rank_load[q] -= share[h]
            rank_load[p] += share[h]
            free[p] -= 1
            free[q] += 1
            r = q
        holds[g, r] = True
        rank_load[r] += share[g]
        free[r] -= 1
    return holds


def _is_int(value) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def _check_counts(num_experts, world_size, kind: str) -> None:
    for name, value in (("num_experts", num_experts), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"Placement.{kind}: {name} must be a positive int; got {value!r}")
    if num_experts < world_size:
        raise ValueError(f"Placement.{kind}: {num_experts} experts cannot be split over {world_size} ranks: every "
                         "rank must hold at least one")


@dataclasses.dataclass
class Dispatched:
    """What ``dispatch`` hands to ``compute`` and ``combine`` on one rank.

    x: [rows, hidden] received hidden states (a strided view of the receive
    buffer); topk_weights: float32 [rows, top_k]; topk_ids: int32 [rows, top_k]
    global ids (-1 in unused fixed-capacity slots). dest: int64 [num_tokens,
    world_size], the row of the combine buffer that holds rank p's partial sum
    for home token t, or the buffer's zero row when t sent nothing to p.
    send_rows/recv_rows: rows sent to and received from each rank (None with
    fixed capacity, where every rank exchanges ``capacity`` rows with every rank).
    """

    x: object
    topk_weights: object
    topk_ids: object
    dest: object
    send_rows: list[int] | None
    recv_rows: list[int] | None
    num_tokens: int


def _membership(group, who: str):
    """(group, its size, this process's rank in it); the default group for None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "first (torchrun sets up its environment)")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{who}: this process is not a member of the group it was given")
    return group, dist.get_world_size(group), rank


def _gather_or_raise(group, world_size: int, problem: Exception | None, view, who: str, what: str) -> list:
    """Every rank's ``view``, once no rank has a ``problem``. With one, every
    rank raises (the rank that had it, its own error), so a check that fails on
    one rank cannot leave the others waiting in a later collective."""
    import torch.distributed as dist

    mine = dict(problem=None if problem is None else f"{type(problem).__name__}: {problem}", view=view)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    if problem is not None:
        raise problem
    for r, theirs in enumerate(gathered):
        if theirs["problem"] is not None:
            raise ValueError(f"{who}: rank {r} could not {what} ({theirs['problem']}), so no rank can run the "
                             "layer")
    return [theirs["view"] for theirs in gathered]


class ExpertParallelMoE:
    """A MoE layer whose experts are split over the ranks of a torch.distributed
    process group. Every rank builds one from its own experts and calls it at
    the same time (a collective).

    w13_shard, w2_shard: this rank's experts (fm.ExpertStack), in local-id
    order: ``placement.local_experts(rank)``. placement: fm.Placement over the
    group's size. group: a ProcessGroup (default: the world). tokens:
    "sharded" (each rank passes its own tokens and gets their outputs; counts
    may differ between ranks, zero included) or "replicated" (every rank passes
    the same tokens; each rank takes a 1/world_size slice as its home tokens
    and every rank gets the whole output). max_tokens: None for exact
    all-to-all splits (one host read of the split sizes per call), or the most
    tokens a call may pass (per rank when sharded, in all when replicated) for
    fixed-capacity exchanges with no host read: CUDA-graph capturable.
    block_size: the local layer's routing block (fm.MoE's; None picks one per
    call). apply_router_weight_on_input: scale the first GEMM's output by the
    router weight instead of the second's (fm.fused_moe's; Llama 4's order).
    """

    def __init__(self, w13_shard: ExpertStack, w2_shard: ExpertStack, *, top_k: int, placement: Placement,
                 group=None, tokens: str = "sharded", max_tokens: int | None = None, block_size: int | None = None,
                 apply_router_weight_on_input: bool = False):
        self.group, self.world_size, self.rank = _membership(group, "ExpertParallelMoE")
        # Building the layer is a collective: every rank's checks are gathered
        # before any rank raises, so a rank with bad arguments fails all of them
        # together instead of leaving the others waiting in their first exchange.
        problem = view = None
        try:
            self._build(w13_shard, w2_shard, top_k, placement, tokens, max_tokens, block_size,
                        apply_router_weight_on_input)
        except (TypeError, ValueError) as e:
            problem = e
        agreed = ("placement", "top_k", "hidden", "intermediate", "dtype", "tokens", "max_tokens",
                  "apply_router_weight_on_input")
        if problem is None:
            view = dict(placement=[list(held) for held in placement.replicas], top_k=self.top_k, hidden=self.hidden,
                        intermediate=w2_shard.k, dtype=self.dtype, tokens=tokens, max_tokens=max_tokens,
                        apply_router_weight_on_input=bool(apply_router_weight_on_input),
                        placement_repr=repr(placement))
        views = _gather_or_raise(self.group, self.world_size, problem, view, "ExpertParallelMoE",
                                 "build its part of the layer")
        for key in agreed:
            values = [v[key] for v in views]
            if any(v != values[0] for v in values):
                shown = [v["placement_repr"] for v in views] if key == "placement" else values
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
                raise ValueError(f"ExpertParallelMoE: the ranks disagree on {key} ({per_rank}); every rank must "
                                 "build the layer with the same arguments and expert shapes")
        self._allocate()

    def _build(self, w13_shard, w2_shard, top_k, placement, tokens, max_tokens, block_size,
               apply_router_weight_on_input) -> None:
        """This rank's checks and state; raises on bad arguments."""
        import torch

        name = "ExpertParallelMoE"
        if not isinstance(placement, Placement):
            raise TypeError(f"{name}: placement must be an fm.Placement (Placement.contiguous / round_robin); got "
                            f"{type(placement).__name__}")
        if placement.world_size != self.world_size:
            raise ValueError(f"{name}: placement is over {placement.world_size} ranks; the group has "
                             f"{self.world_size}: build it with world_size={self.world_size}")
        local = placement.local_experts(self.rank)
        for arg, stack in (("w13_shard", w13_shard), ("w2_shard", w2_shard)):
            if not isinstance(stack, ExpertStack):
                raise TypeError(f"{name}: {arg} must be an fm.ExpertStack; got {type(stack).__name__}")
            if stack.num_experts != len(local):
                shown = local if len(local) <= 8 else f"{local[:4]} ... {local[-2:]}"
                raise ValueError(f"{name}: {arg} holds {stack.num_experts} experts; {placement!r} gives rank "
                                 f"{self.rank} {len(local)} experts (global ids {shown}): load exactly those")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or \
                not 1 <= top_k <= placement.num_experts:
            raise ValueError(f"{name}: top_k must be an int in [1, {placement.num_experts}] (the global expert "
                             f"count); got {top_k!r}")
        if tokens not in TOKENS:
            raise ValueError(f"{name}: tokens must be one of {TOKENS}; got {tokens!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                       or max_tokens < 1):
            raise ValueError(f"{name}: max_tokens must be None or a positive int; got {max_tokens!r}")
        if not isinstance(apply_router_weight_on_input, (bool, np.bool_)):
            raise TypeError(f"{name}: apply_router_weight_on_input must be a bool; got "
                            f"{type(apply_router_weight_on_input).__name__}")
        self.placement, self.top_k, self.tokens, self.max_tokens = placement, int(top_k), tokens, max_tokens
        self.num_experts = placement.num_experts
        self.hidden = w13_shard.k
        self.dtype = w13_shard.dtype
        kind, index = tuple(w13_shard._core.device)
        self.device = torch.device("cpu") if kind == 1 else torch.device("cuda", index)
        self._torch_dtype = getattr(torch, self.dtype)
        self.expert_map = torch.from_numpy(placement.expert_map(self.rank)).to(self.device)
        # Where this rank's pairs go (Placement's rule): the expert's replicas
        # (padded by repeating them), how many, and how many ranks below this
        # one lack it. Without replicas the first column is each expert's rank.
        replicas = placement.replicas
        widest = max(len(held) for held in replicas)
        self._has_replicas = widest > 1
        table = np.array([[held[i % len(held)] for i in range(widest)] for held in replicas], np.int64)
        lacking_below = [sum(1 for r in range(self.rank) if r not in held) for held in replicas]
        self._replica_ranks = torch.from_numpy(table).to(self.device)
        self._replica_counts = torch.tensor([len(held) for held in replicas], dtype=torch.int64, device=self.device)
        self._turn = torch.tensor(lacking_below, dtype=torch.int64, device=self.device)
        self._local = MoE(w13_shard, w2_shard, top_k=self.top_k, expert_map=self.expert_map, block_size=block_size,
                          apply_router_weight_on_input=bool(apply_router_weight_on_input))

    def _allocate(self) -> None:
        import torch

        # A packed row: hidden state, router weights (float32), expert ids (int32),
        # padded to 16 bytes so every row of the received hidden states starts
        # where a GPU kernel's 16-byte loads may begin.
        self._x_bytes = self.hidden * torch.empty(0, dtype=self._torch_dtype).element_size()
        self._weights_at = -(-self._x_bytes // 4) * 4
        self._ids_at = self._weights_at + 4 * self.top_k
        self.row_bytes = -(-(self._ids_at + 4 * self.top_k) // 16) * 16
        # The row an unused fixed-capacity slot carries: ids -1, dropped by align.
        self._empty_row = torch.zeros(self.row_bytes, dtype=torch.uint8, device=self.device)
        self._empty_row[self._ids_at:self._ids_at + 4 * self.top_k] = 255

        self.capacity = None
        if self.max_tokens is not None:
            # Rows each rank sends every rank: a rank's home tokens may all go to one peer.
            n = self.world_size
            self.capacity = self.max_tokens if self.tokens == "sharded" else -(-self.max_tokens // n)
            slots = n * self.capacity
            u8, f32 = dict(dtype=torch.uint8, device=self.device), dict(dtype=torch.float32, device=self.device)
            self._packed = torch.empty(self.capacity + 1, self.row_bytes, **u8)
            self._send = torch.empty(slots, self.row_bytes, **u8)
            self._recv = torch.empty(slots, self.row_bytes, **u8)
            self._partial = torch.empty(slots, self.hidden, **f32)
            self._back = torch.empty(slots + 1, self.hidden, **f32)
            self._back[slots].zero_()

    def __repr__(self) -> str:
        return (f"ExpertParallelMoE(rank {self.rank} of {self.world_size}, {self.placement!r}, "
                f"local experts {self.placement.local_experts(self.rank)}, top_k={self.top_k}, "
                f"hidden={self.hidden}, dtype={self.dtype}, tokens={self.tokens!r}, max_tokens={self.max_tokens})")

    # Set by fm.load_expert_parallel_layer: the model's router (a
    # ferrum_moe.router.Router) and its shared expert MLP, if it has one.
    router = None
    shared_expert = None

    def route(self, hidden_states):
        """hidden_states [num_tokens, hidden] -> (topk_weights float32, topk_ids
        int32) [num_tokens, top_k] by the model's own router rule, on the host
        (as fm.MoE.route)."""
        if self.router is None:
            raise ValueError("ExpertParallelMoE.route: this layer has no router (only layers from "
                             "fm.load_expert_parallel_layer have one); pass topk_weights and topk_ids to the layer")
        return self.router(hidden_states)

    def forward(self, hidden_states):
        """The whole layer as the model computes it on this rank's tokens: route,
        the routed experts (wherever they live), plus the shared experts, which
        every rank holds whole and runs on the tokens it was given."""
        topk_weights, topk_ids = self.route(hidden_states)
        out = self(hidden_states, topk_weights, topk_ids)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        return out

    # ---- inputs ------------------------------------------------------------------------------------------

    def _as_torch(self, a, name: str):
        import torch

        if not isinstance(a, torch.Tensor):
            a = torch.from_dlpack(import_array(a, name))
        if a.device != self.device:
            raise ValueError(f"ExpertParallelMoE: {name} is on {a.device}; this rank's experts are on "
                             f"{self.device}: pass {name} on {self.device}")
        return a

    def _inputs(self, x, topk_weights, topk_ids):
        import torch

        x = self._as_torch(x, "x")
        tw = self._as_torch(topk_weights, "topk_weights")
        ids = self._as_torch(topk_ids, "topk_ids")
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"ExpertParallelMoE: x must be [num_tokens, hidden={self.hidden}]; got shape "
                             f"{list(x.shape)}")
        if x.dtype != self._torch_dtype:
            raise ValueError(f"ExpertParallelMoE: x is {x.dtype}; the experts compute in {self.dtype}")
        for arg, t in (("topk_ids", ids), ("topk_weights", tw)):
            if tuple(t.shape) != (x.shape[0], self.top_k):
                raise ValueError(f"ExpertParallelMoE: {arg} must be [num_tokens={x.shape[0]}, top_k={self.top_k}]; "
                                 f"got shape {list(t.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ExpertParallelMoE: topk_ids must be int32 or int64; got {ids.dtype}")
        if tw.dtype != torch.float32:
            raise ValueError(f"ExpertParallelMoE: topk_weights must be float32; got {tw.dtype}")
        return x, tw, ids

    def _stream(self):
        import torch

        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    # ---- the three phases --------------------------------------------------------------------------------

    def dispatch(self, x, topk_weights, topk_ids) -> Dispatched:
        """Sends this rank's home tokens to the ranks that compute their pairs
        (fm.Placement's rule) and receives the rows other ranks send here. x: [num_tokens, hidden] in the
        layer's dtype; topk_weights: float32 [num_tokens, top_k]; topk_ids:
        int32/int64 [num_tokens, top_k] global ids (ids outside [0, num_experts)
        are dropped, as fm.fused_moe drops them)."""
        import torch
        import torch.distributed as dist

        x, tw, ids = self._inputs(x, topk_weights, topk_ids)
        m, n, dev = x.shape[0], self.world_size, self.device
        if self.capacity is not None and m > self.capacity:
            raise ValueError(f"ExpertParallelMoE: dispatch got {m} tokens; this layer sends at most "
                             f"{self.capacity} per rank (max_tokens={self.max_tokens}, tokens={self.tokens!r})")
        valid = (ids >= 0) & (ids < self.num_experts)
        expert = ids.clamp(0, self.num_experts - 1).long()
        # The rank computing each pair: this rank where it holds the expert, else
        # replica (t + ranks below this one lacking it) % replicas; n for dropped pairs.
        if self._has_replicas:
            pick = (torch.arange(m, device=dev)[:, None] + self._turn[expert]) % self._replica_counts[expert]
            pair_rank = torch.where(self.expert_map[expert] >= 0, self.rank, self._replica_ranks[expert, pick])
        else:
            pair_rank = self._replica_ranks[expert, 0]  # each expert's one rank
        pair_rank = torch.where(valid, pair_rank, n)
        # sends[t, p]: a pair of token t is computed on rank p (column n collects dropped pairs).
        sends = torch.zeros(m, n + 1, dtype=torch.bool, device=dev).scatter_(1, pair_rank, True)[:, :n]
        slot = sends.cumsum(0) - 1  # t's place among the tokens sent to p

        if self.capacity is None:
            send_counts = sends.sum(0)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            send_rows, recv_rows = send_counts.tolist(), recv_counts.tolist()  # the one host read
            first_row = torch.cumsum(send_counts, 0) - send_counts
            total_send, total_recv = sum(send_rows), sum(recv_rows)
            packed = torch.empty(m + 1, self.row_bytes, dtype=torch.uint8, device=dev)
        else:
            send_rows = recv_rows = None
            first_row = torch.arange(n, device=dev) * self.capacity
            total_send = total_recv = n * self.capacity
            packed = self._packed
        dest = torch.where(sends, first_row + slot, total_send)

        packed[:m, :self._x_bytes].view(self._torch_dtype).copy_(x)
        packed[:m, self._weights_at:self._ids_at].view(torch.float32).copy_(tw)
        # Invalid ids become -1 before the int32 narrowing, so none wraps into a valid one.
        packed[:m, self._ids_at:self._ids_at + 4 * self.top_k].view(torch.int32).copy_(torch.where(valid, ids, -1))
        packed[m].copy_(self._empty_row)
        # The home token of each send row (m, the empty row, for unused slots);
        # dropped (t, p) all land on the extra last entry.
        source = torch.full((total_send + 1,), m, dtype=torch.int64, device=dev)
        source.scatter_(0, dest.reshape(-1), torch.arange(m, device=dev).repeat_interleave(n))
        if self.capacity is None:
            send = torch.index_select(packed, 0, source[:total_send])
            recv = torch.empty(total_recv, self.row_bytes, dtype=torch.uint8, device=dev)
        else:
            send = torch.index_select(packed, 0, source[:total_send], out=self._send)
            recv = self._recv
        if self._has_replicas:
            # A row carries the ids of the pairs its destination computes, -1 for
            # the others: a rank holding a replica of a pair's expert that another
            # rank was picked for must not compute that pair too. (Without
            # replicas each rank holds only the experts it computes, and its
            # expert_map drops the others' pairs.)
            row_rank = torch.full((total_send + 1,), n, dtype=torch.int64, device=dev)  # n: unused slots
            row_rank.scatter_(0, dest.reshape(-1), torch.arange(n, device=dev).repeat(m))
            computed_there = torch.cat([pair_rank, pair_rank.new_full((1, self.top_k), n)])[source[:total_send]] == \
                row_rank[:total_send, None]
            send[:, self._ids_at:self._ids_at + 4 * self.top_k].view(torch.int32).masked_fill_(~computed_there, -1)
        dist.all_to_all_single(recv, send, recv_rows, send_rows, group=self.group)

        return Dispatched(
            x=recv[:, :self._x_bytes].view(self._torch_dtype),
            topk_weights=recv[:, self._weights_at:self._ids_at].view(torch.float32).contiguous(),
            topk_ids=recv[:, self._ids_at:self._ids_at + 4 * self.top_k].view(torch.int32).contiguous(),
            dest=dest, send_rows=send_rows, recv_rows=recv_rows, num_tokens=m)

    def compute(self, dispatched: Dispatched):
        """This rank's experts over the received rows: float32 [rows, hidden],
        each row the sum over its pairs routed here of router weight x expert
        output (zero for a row with none)."""
        import torch

        rows = dispatched.x.shape[0]
        partial = self._partial if self.capacity is not None else \
            torch.empty(rows, self.hidden, dtype=torch.float32, device=self.device)
        return self._local(dispatched.x, dispatched.topk_weights, dispatched.topk_ids, out=partial,
                           stream=self._stream())

    def combine(self, dispatched: Dispatched, partial, *, out=None):
        """Returns the partial sums to their home ranks and adds them there in
        float32: out [num_tokens, hidden] in the layer's dtype (a new tensor
        unless ``out`` is given)."""
        import torch
        import torch.distributed as dist

        dest = dispatched.dest
        if self.capacity is not None:
            back, total = self._back, self.world_size * self.capacity
        else:
            total = sum(dispatched.send_rows)
            back = torch.empty(total + 1, self.hidden, dtype=torch.float32, device=self.device)
            back[total].zero_()
        dist.all_to_all_single(back[:total], partial, dispatched.send_rows, dispatched.recv_rows, group=self.group)
        # Rank by rank in a fixed order, so the float32 sum is the same on every run.
        acc = torch.index_select(back, 0, dest[:, 0])
        for p in range(1, self.world_size):
            acc += torch.index_select(back, 0, dest[:, p])
        if out is None:
            return acc.to(self._torch_dtype)
        out.copy_(acc)
        return out

    # ---- the whole layer ---------------------------------------------------------------------------------

    def __call__(self, x, topk_weights, topk_ids, *, out=None):
        """y[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]), each
        expert computed on the rank the placement picks (the math of fm.fused_moe).

        x: [num_tokens, hidden] in the layer's dtype; topk_weights: float32
        [num_tokens, top_k]; topk_ids: int32/int64 [num_tokens, top_k] global
        ids. torch tensors on this rank's device, or any DLPack array there.
        Returns out, or a new [num_tokens, hidden] array of x's type. Every rank
        of the group must call at the same time; with tokens="replicated", with
        the same inputs.
        """
        import torch

        caller = x
        x, tw, ids = self._inputs(x, topk_weights, topk_ids)
        out_t = None if out is None else self._output(out, x.shape[0])
        if self.tokens == "sharded":
            dispatched = self.dispatch(x, tw, ids)
            y = self.combine(dispatched, self.compute(dispatched), out=out_t)
        else:
            y = self._replicated(x, tw, ids, out_t)
        if out is not None:
            return out
        return y if isinstance(caller, torch.Tensor) else to_caller(import_array(y, "out"), caller)

    def _output(self, out, num_tokens: int):
        o = self._as_torch(out, "out")
        if tuple(o.shape) != (num_tokens, self.hidden) or o.dtype != self._torch_dtype:
            raise ValueError(f"ExpertParallelMoE: out must be [num_tokens={num_tokens}, hidden={self.hidden}] "
                             f"{self.dtype}; got shape {list(o.shape)}, {o.dtype}")
        return o

    def _replicated(self, x, tw, ids, out):
        """Rank r takes rows [r * chunk, (r + 1) * chunk) as its home tokens;
        the outputs are gathered so every rank returns all of them."""
        import torch

        m, n = x.shape[0], self.world_size
        if self.max_tokens is not None and m > self.max_tokens:
            raise ValueError(f"ExpertParallelMoE: x has {m} tokens; this layer was built with "
                             f"max_tokens={self.max_tokens}")
        chunk = -(-m // n)
        lo, hi = min(self.rank * chunk, m), min((self.rank + 1) * chunk, m)
        mine = torch.empty(chunk, self.hidden, dtype=self._torch_dtype, device=self.device)
        dispatched = self.dispatch(x[lo:hi], tw[lo:hi], ids[lo:hi])
        self.combine(dispatched, self.compute(dispatched), out=mine[:hi - lo])
        # Short chunks are the last ones, so their unwritten rows land past row m.
        gathered = torch.empty(n * chunk, self.hidden, dtype=self._torch_dtype, device=self.device)
        _all_gather_single(gathered, mine, group=self.group)
        if out is None:
            return gathered[:m]
        out.copy_(gathered[:m])
        return out


def _all_gather_single(output, input, group):
    import torch.distributed as dist

    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def load_expert_parallel_layer(path, layer: int, *, placement: Placement | None = None, group=None,
                               backend: str = "auto", device="cpu", dtype: str = "float16", tokens: str = "sharded",
                               max_tokens: int | None = None, progress: bool = False) -> ExpertParallelMoE:
    """MoE layer ``layer`` of a published GPTQ/AWQ checkpoint (as
    fm.load_moe_layers reads them) split over the ranks of ``group``; every
    rank calls it at once. Each rank checks every header of the layer (no data),
    then reads only the experts ``placement`` gives it (default
    Placement.contiguous over the group), and the router and the shared expert,
    which every rank holds whole. Returns this rank's fm.ExpertParallelMoE, with
    ``route`` and ``forward`` as fm.MoE.from_pretrained's layers have them.
    A check that fails on any rank raises on every rank."""
    from tqdm import tqdm

    from .architectures import expert_indices
    from .discovery import parse_device, resolve
    from .pretrained import SharedExpert, _to_stack, layer_tensors, open_model, read_mlp
    from .router import Router
    from .stack import _check_dtype

    group, world_size, rank = _membership(group, "load_expert_parallel_layer")
    problem = loaded = None
    try:
        b = resolve(backend, parse_device(device)).name
        dtype = _check_dtype(dtype)
        ckpt, spec = open_model(path)
        with ckpt:
            i = spec.check_layer(layer)
            t = layer_tensors(ckpt, spec, i, expert_indices(ckpt.names(), spec))
            placement = placement if placement is not None else Placement.contiguous(spec.num_experts, world_size)
            if not isinstance(placement, Placement) or placement.num_experts != spec.num_experts or \
                    placement.world_size != world_size:
                raise ValueError(f"load_expert_parallel_layer: placement must be an fm.Placement of the layer's "
                                 f"{spec.num_experts} experts over the group's {world_size} ranks; got {placement!r}")
            mine = placement.local_experts(rank)
            where = f"{ckpt.path}: layer {i}"
            w13, w2 = [], []
            for g in tqdm(mine, unit="expert", desc=f"rank {rank}: {ckpt.path.name}", disable=not progress):
                a, c = read_mlp(ckpt, t.experts[g])
                w13.append(a)
                w2.append(c)
            stacks = (_to_stack(w13, f"{where}: rank {rank}'s experts' w13 [gate | up]", b, device, dtype),
                      _to_stack(w2, f"{where}: rank {rank}'s experts' w2 (down)", b, device, dtype))
            del w13, w2
            bias = None if t.correction_bias is None else ckpt.read(t.correction_bias)
            router = Router(ckpt.read(t.router), spec.routing, bias)
            shared = None
            if t.shared is not None:
                a, c = read_mlp(ckpt, t.shared)
                mlp = MoE(_to_stack([a], f"{where}: shared expert's w13", b, device, dtype),
                          _to_stack([c], f"{where}: shared expert's w2", b, device, dtype), top_k=1)
                shared = SharedExpert(mlp, None if t.shared_gate is None else ckpt.read(t.shared_gate))
            loaded = (stacks, spec.top_k, router, shared)
    except (ValueError, TypeError, NotImplementedError) as e:  # fm.CheckpointError is a ValueError
        problem = e
    _gather_or_raise(group, world_size, problem, None, "load_expert_parallel_layer", "read its experts")
    stacks, top_k, router, shared = loaded
    ep = ExpertParallelMoE(*stacks, top_k=top_k, placement=placement, group=group, tokens=tokens,
                           max_tokens=max_tokens)
    ep.router, ep.shared_expert = router, shared
    return ep
