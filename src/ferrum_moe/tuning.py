"""Routing block sizes measured on this machine: ``tune_block_sizes`` times a
layer at each token count with each candidate block and keeps the fastest in
the block-table cache, where ``fused_moe`` and ``MoE`` find it
(block_tables.py: after ``FERRUM_MOE_BLOCK_TABLES``, before the shipped tables).

The inputs are random: tokens of normal values, each routed to ``top_k``
distinct experts drawn uniformly (a real model's routing is less even, so a
layer whose experts are very unevenly loaded may prefer other blocks). Host
backends are timed by the wall clock; CUDA layers by CUDA events around a graph
replay of one call, with the L2 cache flushed before each, as the benchmarks
time them (this needs PyTorch). One token is not swept by default: a layer
call of one token routes each pair as its own block where the backend can
(CPU and CUDA do), and asks no table.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import re
import statistics
import tempfile
import time

import numpy as np

from . import block_tables
from ._checks import MAX_BLOCK_SIZE, checked_int
from .routing import PAIR_ROUTING, default_block_size
from .stack import ExpertStack

DEFAULT_TOKENS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Pair routing (no align) first: a table the tuner writes replaces the shipped
# entry for its layer, so it must time what the shipped one may have chosen.
DEFAULT_BLOCKS = (PAIR_ROUTING, 8, 16, 32, 64, 128)
MAX_TOKENS = 1 << 20  # a sweep's largest batch: [tokens, hidden] inputs are allocated per count


@dataclasses.dataclass
class TunedCount:
    """One token count of a sweep: each block's time per call (microseconds),
    the rule's block, and the block kept (the fastest, or the rule's within
    the margin)."""

    tokens: int
    times_us: dict[int, float]
    rule: int
    block: int


@dataclasses.dataclass
class TuneResult:
    """A sweep: where it was run, what it kept, and the table file written (None
    with ``save=False``)."""

    backend: str
    device: str
    counts: list[TunedCount]
    path: pathlib.Path | None


def _check(w13, w2, top_k, token_counts, blocks, margin, seconds, rounds, seed) -> tuple[list[int], list[int]]:
    """The token counts and blocks, sorted, once every argument is known good."""
    from .moe import _check_pair

    _check_pair(w13, w2)
    if top_k > w13.num_experts:
        raise ValueError(f"tune_block_sizes: top_k must be in [1, {w13.num_experts}] (the stacks' experts); "
                         f"got {top_k}")
    lists = []
    for name, values, low, high in (("token_counts", token_counts, 1, MAX_TOKENS),
                                    ("blocks", blocks, PAIR_ROUTING, MAX_BLOCK_SIZE)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"tune_block_sizes: {name} must be a sequence of ints; got {type(values).__name__}")
        values = [checked_int(v, f"tune_block_sizes: {name}[{i}]", low, high) for i, v in enumerate(values)]
        if not values:
            raise ValueError(f"tune_block_sizes: {name} must not be empty")
        lists.append(sorted(set(values)))
    for name, value in (("margin", margin), ("seconds", seconds)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"tune_block_sizes: {name} must be a number; got {type(value).__name__}")
    if not 0 <= margin < 1:
        raise ValueError(f"tune_block_sizes: margin must be in [0, 1); got {margin!r}")
    if not (0 < seconds <= 60 and math.isfinite(seconds)):
        raise ValueError(f"tune_block_sizes: seconds must be in (0, 60]; got {seconds!r}")
    checked_int(rounds, "tune_block_sizes: rounds", 1, 100)
    checked_int(seed, "tune_block_sizes: seed", 0)
    return lists[0], lists[1]


def _inputs(rng, m: int, hidden: int, experts: int, top_k: int, dtype: str):
    """x [m, hidden], topk_weights float32 and topk_ids int32 [m, top_k] (host)."""
    from .testing import random_activations, random_routing

    return (random_activations(rng, (m, hidden), dtype), *random_routing(rng, m, experts, top_k))


class _HostTimer:
    """Wall-clock time per call: calls in a row for ``seconds``, the best of
    the rounds the caller runs."""

    stream = None  # the layer's calls take no stream

    def __init__(self, seconds: float):
        self.seconds = seconds

    def put(self, a: np.ndarray):
        return a

    def empty_like(self, a):
        return np.empty_like(a)

    def prepare(self, call):
        call()  # warm: sizes the layer's buffers
        return call

    def time(self, call) -> float:
        calls, start = 0, time.perf_counter()
        while True:
            call()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= self.seconds:
                return elapsed / calls


class _CudaTimer:
    """CUDA events around a graph replay of one call, the L2 cache flushed
    before each replay: the median of the replays that fit ``seconds``."""

    def __init__(self, seconds: float, index: int):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("tune_block_sizes: timing a CUDA layer needs PyTorch (CUDA events and "
                                      "graphs); install torch") from None
        self.torch, self.seconds = torch, seconds
        self.device = torch.device("cuda", index)
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 << 20)
        self.flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=self.device)
        # The stream of every warm-up, capture and replay (the layer's calls pass
        # it): one for all, as a layer keeps its buffers per stream.
        self.stream = torch.cuda.Stream(self.device)

    def put(self, a: np.ndarray):
        torch = self.torch
        if a.dtype.name == "bfloat16":  # ml_dtypes' type: torch takes its bits (as int16: torch < 2.3 has no uint16)
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(a).to(self.device)

    def empty_like(self, a):
        return self.torch.empty_like(a)

    def prepare(self, call):
        torch, stream = self.torch, self.stream
        with torch.cuda.device(self.device):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                call()  # warm: sizes the layer's buffers for this stream before the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                call()
        return graph.replay

    def time(self, replay) -> float:
        torch = self.torch
        times, spent = [], 0.0
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            while len(times) < 5 or (spent < self.seconds and len(times) < 200):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.flush.zero_()
                start.record(self.stream)
                replay()
                end.record(self.stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
                spent += times[-1]
        return statistics.median(times)


def _timer(stack: ExpertStack, seconds: float):
    kind, index = tuple(stack._core.device)
    if kind == 1:
        return _HostTimer(seconds)
    if kind == 2:
        return _CudaTimer(seconds, index)
    raise NotImplementedError(f"tune_block_sizes: no timer for {stack.device} (host and CUDA devices only)")


def tune_block_sizes(w13: ExpertStack, w2: ExpertStack, *, top_k: int, token_counts=DEFAULT_TOKENS,
                     blocks=DEFAULT_BLOCKS, margin: float = 0.03, seconds: float = 0.05, rounds: int = 3,
                     seed: int = 0, save: bool = True, progress=None) -> TuneResult:
    """Times the layer (w13, w2, top_k) at each token count with each routing
    block, keeps per count the fastest block (or the rule's where it is within
    ``margin``), and, with ``save``, writes them to this machine's block-table
    cache (``block_tables.cache_dir()``), merged with what it held: later
    layer calls on this backend, device description and layer shape (experts,
    top-k, sizes, dtype, bits, group size) take them when no block is named.

    blocks: the candidates, 0 (routing.PAIR_ROUTING) for no align (each pair
    routed by the GEMMs). seconds: the time per (count, block) measurement (a round); rounds: how
    many, interleaved over the blocks, the best round kept (a round on CUDA
    is the median of its replays). progress: called with a TunedCount as each
    count is done. Layers already built keep the blocks they chose."""
    top_k = checked_int(top_k, "tune_block_sizes: top_k", 1)
    counts, candidates = _check(w13, w2, top_k, token_counts, blocks, margin, seconds, rounds, seed)
    from .moe import MoE

    timer = _timer(w13, seconds)
    rng = np.random.default_rng(seed)
    layers = {b: MoE(w13, w2, top_k=top_k, block_size=b) for b in candidates}
    result = TuneResult(w13.backend, w13._backend_description, [], None)
    for m in counts:
        x, tw, ids = (timer.put(a) for a in _inputs(rng, m, w13.k, w13.num_experts, top_k, w13.dtype))
        out = timer.empty_like(x)
        calls = {b: timer.prepare(lambda layer=layer: layer(x, tw, ids, out=out, stream=timer.stream))
                 for b, layer in layers.items()}
        times: dict[int, float] = {}
        for _ in range(rounds):
            for b, call in calls.items():
                t = timer.time(call)
                times[b] = min(times.get(b, t), t)
        rule = default_block_size(m * top_k, w13.num_experts)
        tuned = TunedCount(m, {b: t * 1e6 for b, t in times.items()}, rule, block_tables.best_block(times, rule, margin))
        result.counts.append(tuned)
        if progress is not None:
            progress(tuned)
        del calls
    if save:
        result.path = _save(w13, w2, top_k, result)
    return result


def table_file(backend: str, device: str) -> pathlib.Path:
    """The cache file of one backend and device description."""
    where = block_tables.cache_dir()
    if where is None:
        raise OSError(f"tune_block_sizes: there is no home directory for the block-table cache; set "
                      f"{block_tables.CACHE_ENV} to a writable directory, or pass save=False")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:48]
    digest = hashlib.sha1(device.encode()).hexdigest()[:8]
    return where / f"{backend}-{slug}-{digest}.json"


def _save(w13: ExpertStack, w2: ExpertStack, top_k: int, result: TuneResult) -> pathlib.Path:
    """Merges the sweep into the cache table of its backend and device
    (written whole to a temporary file, then renamed over the old one; of two
    tuning runs at once, the later write wins)."""
    from . import __version__

    path = table_file(result.backend, result.device)
    shape = dict(experts=w13.num_experts, top_k=top_k, hidden=w13.k, inter=w2.k, dtype=w13.dtype, bits=w13.bits,
                 group_size=w13.group_size)
    layers = []
    if path.exists():
        try:
            block_tables.read_table(path)  # a damaged file is refused by name before anything is replaced
        except ValueError as e:
            raise ValueError(f"tune_block_sizes: {e}; delete it to start a new one") from None
        layers = json.loads(path.read_text(encoding="utf-8"))["layers"]
    mine = next((layer for layer in layers if all(layer[k] == v for k, v in shape.items())), None)
    blocks = dict(mine["blocks"]) if mine else {}
    blocks.update({c.tokens: c.block for c in result.counts})
    if mine is None:
        mine = dict(shape)
        layers.append(mine)
    mine["blocks"] = [[m, blocks[m]] for m in sorted(blocks)]
    table = dict(schema=block_tables.SCHEMA, backend=result.backend, device=result.device,
                 measured=datetime.date.today().isoformat(),
                 source=f"fm.tune_block_sizes (ferrum-moe {__version__})", layers=layers)
    block_tables.parse_table(table, f"the table for {path}")  # what the lookup will accept
    written = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
            written = f.name
            f.write(block_tables.format_table(table))
        os.replace(written, path)
        written = None
    except OSError as e:
        raise OSError(f"tune_block_sizes: cannot write the block table {path} ({e.strerror or e}); set "
                      f"{block_tables.CACHE_ENV} to a writable directory, or pass save=False") from None
    finally:
        if written is not None and os.path.exists(written):  # not renamed: an error or an interrupt
            os.unlink(written)
    block_tables.reread()
    return path
