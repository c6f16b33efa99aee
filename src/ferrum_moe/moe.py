"""A whole MoE layer: align -> w13 GEMM -> silu(gate) * up -> w2 GEMM with the
router weight -> top-k sum accumulated in float32 (one token: no align, the
GEMMs route each pair themselves where the backend can)."""

from __future__ import annotations

import math
import os
import threading

import numpy as np

from . import _core
from ._checks import MAX_BLOCK_SIZE, checked_int
from .arrays import host_copy, import_array, import_output, stream_handle, to_caller
from .block_tables import measured_block_size
from .routing import PAIR_ROUTING, _routing_buffers, align_block, default_block_size
from .discovery import device_name
from .stack import ExpertStack

_ACTIVATIONS = ("silu",)
_MAX_KEPT_BLOCKS = 1024  # token counts a layer remembers its block for


class _Workspace:
    """Intermediate buffers. A layer's (``temporary=False``) are kept between
    calls and grown only when a call needs more (each call reads views of their
    first elements), so a warmed-up layer allocates nothing per call. A single
    call's (``temporary=True``) are dropped when it returns: the backend may
    allocate them stream-ordered (CUDA: cudaMallocAsync), which stream capture
    records as graph memory nodes, so even a first call captures."""

    def __init__(self, temporary: bool = False):
        self._buffers: dict[str, _core.Tensor] = {}
        # The last view taken of each buffer, by what was asked: a layer called
        # at one token count over and over (decode) takes the same views each
        # time, and making one costs about a microsecond.
        self._views: dict[str, tuple[tuple, _core.Tensor]] = {}
        self._temporary = temporary
        # The routing block chosen at each token count (layer_block_size asks
        # the environment and the tables: about 2 us a call).
        self._blocks: dict[int, int] = {}

    def block_for(self, num_tokens: int, choose) -> int:
        """The routing block kept for `num_tokens`, or choose()'s, then kept."""
        block = self._blocks.get(num_tokens)
        if block is None:
            if len(self._blocks) >= _MAX_KEPT_BLOCKS:
                self._blocks.clear()
            block = self._blocks[num_tokens] = choose()
        return block

    def take(self, name: str, backend, device, dtype: str, shape, stream: int, capacity: int = 0) -> _core.Tensor:
        """A view of `shape` on buffer `name`, grown (to `capacity` elements
        when that is more) if it holds fewer."""
        asked = (dtype, device, tuple(shape), capacity)
        last = self._views.get(name)
        if last is not None and last[0] == asked:
            return last[1]
        numel = math.prod(shape)  # (np.prod costs ~3 us a call, six calls a layer)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or tuple(buf.device) != device or buf.shape[0] < numel:
            buf = backend.empty(device[0], device[1], dtype, [max(numel, capacity, 1)], stream,
                                temporary=self._temporary)
            self._buffers[name] = buf
        view = buf.view(list(shape))
        self._views[name] = (asked, view)
        return view


def _check_pair(w13: ExpertStack, w2: ExpertStack) -> None:
    for name, s in (("w13", w13), ("w2", w2)):
        if not isinstance(s, ExpertStack):
            raise TypeError(f"fused_moe: {name} must be an fm.ExpertStack; got {type(s).__name__}")
    if w13.n_per_expert % 2:
        raise ValueError(f"fused_moe: w13's n_per_expert {w13.n_per_expert} must be even ([gate | up])")
    if w2.k != w13.n_per_expert // 2:
        raise ValueError(
            f"fused_moe: w2's k is {w2.k}; it must be half of w13's n_per_expert ({w13.n_per_expert} // 2 = "
            f"{w13.n_per_expert // 2}, the intermediate size)"
        )
    if w13.num_experts != w2.num_experts:
        raise ValueError(f"fused_moe: w13 has {w13.num_experts} experts, w2 has {w2.num_experts}")
    if (w13.backend, w13.device, w13.dtype) != (w2.backend, w2.device, w2.dtype):
        raise ValueError(
            f"fused_moe: w13 is {w13.dtype} on {w13.backend}/{w13.device}, w2 is {w2.dtype} on {w2.backend}/{w2.device}"
        )


def _check_local_ids(host_map: np.ndarray, w13: ExpertStack, op: str) -> None:
    """A map naming a local expert the stacks do not hold would route pairs to
    no GEMM while the top-k sum still adds their rows."""
    if host_map.dtype.kind not in "iu":
        return  # the core names the dtype
    local_max = int(host_map.max(initial=-1))
    if local_max >= w13.num_experts:
        raise ValueError(f"{op}: expert_map names local expert {local_max}; the stacks hold "
                         f"{w13.num_experts} (local ids must be in [0, {w13.num_experts}) or -1)")


def layer_block_size(w13: ExpertStack, w2: ExpertStack, top_k: int, num_tokens: int) -> int:
    """The routing block a layer call takes when its caller names none: pair
    routing for one token, a measured block table's (block_tables.py; it may
    say PAIR_ROUTING too), else routing.default_block_size's."""
    if num_tokens == 1:
        return PAIR_ROUTING
    measured = measured_block_size(w13.backend, w13._backend_description, w13.num_experts, top_k, w13.k, w2.k,
                                   w13.dtype, w13.bits, w13.group_size, num_tokens)
    return measured if measured is not None else default_block_size(num_tokens * top_k, w13.num_experts)


def _forward(x, w13: ExpertStack, w2: ExpertStack, topk_weights, topk_ids, activation: str,
             apply_router_weight_on_input: bool, expert_map, out, stream, block_size, workspace: _Workspace | None):
    """The layer; the caller has checked the stacks (_check_pair)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"fused_moe: activation must be one of {_ACTIVATIONS}; got {activation!r}")
    if block_size is not None:
        block_size = checked_int(block_size, "fused_moe: block_size", PAIR_ROUTING, MAX_BLOCK_SIZE)
    s = stream_handle(stream)
    xt = import_array(x, "x", s)
    ids = import_array(topk_ids, "topk_ids", s)
    if len(ids.shape) != 2 or len(xt.shape) != 2 or ids.shape[0] != xt.shape[0]:
        raise ValueError(
            f"fused_moe: x must be [num_tokens, hidden] and topk_ids [num_tokens, top_k]; got shapes "
            f"{list(xt.shape)} and {list(ids.shape)}"
        )
    if hasattr(topk_weights, "shape") and tuple(topk_weights.shape) != tuple(ids.shape):
        raise ValueError(f"fused_moe: topk_weights has shape {list(topk_weights.shape)}; expected {list(ids.shape)} (topk_ids')")
    num_tokens, top_k = ids.shape
    hidden, inter = w13.k, w2.k
    stack_device = w13._device
    for name, t in (("x", xt), ("topk_ids", ids)):
        if tuple(t.device) != stack_device:
            raise ValueError(f"fused_moe: {name} is on {device_name(tuple(t.device))}; the stacks are on "
                             f"{w13.device}: pass {name} on {w13.device}")
    # Flat per-pair weights: [num_tokens * top_k, 1] for the pair-indexed second GEMM.
    tw = import_array(topk_weights, "topk_weights", s)
    if tuple(tw.device) != stack_device:
        raise ValueError(f"fused_moe: topk_weights is on {device_name(tuple(tw.device))}; the stacks are on "
                         f"{w13.device}: pass topk_weights on {w13.device}")
    if not tw.is_compact:
        raise ValueError("fused_moe: topk_weights must be contiguous")
    map_t = None if expert_map is None else import_array(expert_map, "expert_map", s)
    num_experts = map_t.shape[0] if map_t is not None else w13.num_experts
    if map_t is not None and len(map_t.shape) != 1:
        raise ValueError(f"fused_moe: expert_map must be 1-D [num_global_experts]; got shape {list(map_t.shape)}")
    host_map = map_t is not None and map_t.device[0] == 1
    if host_map:
        _check_local_ids(np.from_dlpack(map_t), w13, "fused_moe")
    core = w13._backend
    dev = stack_device
    pairs = num_tokens * top_k
    ws = workspace or _Workspace(temporary=True)
    if block_size is None:
        block_size = ws.block_for(num_tokens, lambda: layer_block_size(w13, w2, top_k, num_tokens))
    # Pair routing (one token by default: align would put each of its pairs in
    # a block of its own, its experts differing): backends that can (ABI 1.2)
    # read topk_ids in the GEMMs themselves and no align runs. Where a backend
    # cannot, the layer aligns at the rule's block.
    pair_routing = block_size == PAIR_ROUTING and core.has_pair_routing and ids.is_compact
    buf = {name: ws.take(name, core, dev, dtype, [pairs, width], s)
           for name, dtype, width in (("gate_up", w13.dtype, 2 * inter), ("act", w13.dtype, inter))}
    if map_t is None or host_map:
        buf["down"] = ws.take("down", core, dev, "float32", [pairs, hidden], s)
    else:
        # A device map is not read on the host (that would synchronise): pairs
        # it sends past the stacks' experts are skipped by both GEMMs, so their
        # rows of the second one must read as zero when the top-k sum adds them.
        buf["down"] = core.empty(dev[0], dev[1], "float32", [pairs, hidden], s, temporary=True, zeroed=True)
    ot = import_output(out, "out", s) if out is not None else core.empty(dev[0], dev[1], w13.dtype, [num_tokens, hidden], s)
    # The steps run in the core, one after another (core/moe.hpp).
    steps = (w13._core, w2._core, xt, ids, tw, map_t, num_experts, apply_router_weight_on_input)
    buffers = (buf["gate_up"], buf["act"], buf["down"], ot, s)
    # False: the plugin refused pair routing (ABI 1.2 without it, plugins.md) and nothing ran. Under
    # pair routing the core may offer the plugin the whole layer in one call (ABI 1.4), unless
    # FERRUM_MOE_LAYER_CALL=0 keeps the steps (read only for pair-routed calls).
    if not pair_routing or not _core.moe_layer(*steps, PAIR_ROUTING, None, None, None, *buffers,
                                               os.environ.get("FERRUM_MOE_LAYER_CALL", "1") != "0"):
        block_size = align_block(block_size, pairs, w13.num_experts)
        _core.moe_layer(*steps, block_size, *_routing_buffers(core, ids, block_size, num_experts, map_t, s, ws),
                        *buffers)
    elif workspace is not None and num_tokens > 1:
        # A layer's routing buffers grow at its largest count whichever routing
        # that count takes, so a smaller count that aligns allocates nothing
        # (MoE's promise: CUDA-graph capture after one call at the largest count).
        _routing_buffers(core, ids, default_block_size(pairs, w13.num_experts), num_experts, map_t, s, ws)
    return out if out is not None else to_caller(ot, x)


def fused_moe(x, w13: ExpertStack, w2: ExpertStack, topk_weights, topk_ids, *, activation: str = "silu",
              apply_router_weight_on_input: bool = False, expert_map=None, out=None, stream=None,
              block_size: int | None = None):
    """y[t] = sum_j topk_weights[t, j] * (silu(x[t] @ G_e) * (x[t] @ U_e)) @ D_e, e = topk_ids[t, j].

    x: [num_tokens, hidden] in the stacks' dtype; w13: stack of [gate | up]
    (n_per_expert = 2 * intermediate); w2: stack with k = intermediate;
    topk_weights: float32 [num_tokens, top_k]; topk_ids: int32/int64
    [num_tokens, top_k] global expert ids. expert_map: int32 [num_global]
    (global -> local or -1): pairs of non-local experts contribute nothing. A
    host map naming a local expert the stacks lack is refused; a device map is
    not read on the host, so such pairs are skipped and the second GEMM's
    output is zero-filled (a stream-ordered temporary). apply_router_weight_on_input scales the first GEMM's output instead of the
    second's. The top-k sum accumulates in float32. block_size: the routing
    block (on CUDA, the GEMM tile height), or 0 (routing.PAIR_ROUTING): no
    align, each pair a block of its own, read from topk_ids by the GEMMs
    (backends of plugin ABI >= 1.2 and contiguous topk_ids; otherwise the
    layer aligns at the rule's block); by
    default pair routing for one token, else a measured block table's
    (block_tables.py) where one has this layer, device and token count, else
    routing.default_block_size's rule. Returns out, or a new [num_tokens,
    hidden] array of x's type.
    """
    _check_pair(w13, w2)
    return _forward(x, w13, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input, expert_map, out,
                    stream, block_size, None)


class MoE:
    """A MoE layer that keeps its intermediate buffers between calls: after one
    call at the largest token count, calls with ``out=`` allocate nothing
    (CUDA-graph capturable on backends whose kernels are) while the routing
    block stays within 8-128 (every default block: the routing buffers are
    sized for all of them), except, with a device-resident ``expert_map``, one
    zero-filled stream-ordered buffer per call (see fused_moe).

    Safe to call from several threads at once: each (thread, stream) pair has
    its own buffers, so no call waits for another. On CUDA a stack must not
    run on two streams at once (its split-K workspace is per stack): calls on
    different streams need their own stacks, or the caller orders the streams.
    ``expert_map`` is checked once here, a device-resident one by one host read.
    Without a ``block_size`` the layer picks the routing block (block tables,
    then the rule: fused_moe) at a token count's first call and keeps it."""

    def __init__(self, w13: ExpertStack, w2: ExpertStack, *, top_k: int, activation: str = "silu",
                 apply_router_weight_on_input: bool = False, expert_map=None, block_size: int | None = None):
        _check_pair(w13, w2)
        top_k = checked_int(top_k, "MoE: top_k", 1)
        if top_k > max(w13.num_experts, 1) and expert_map is None:
            raise ValueError(f"MoE: top_k must be in [1, num_experts={w13.num_experts}]; got {top_k}")
        if block_size is not None:
            block_size = checked_int(block_size, "MoE: block_size", PAIR_ROUTING, MAX_BLOCK_SIZE)
        if expert_map is not None:
            map_t = import_array(expert_map, "expert_map")
            _check_local_ids(np.from_dlpack(map_t) if map_t.device[0] == 1 else host_copy(expert_map, "expert_map"),
                             w13, "MoE")
        self.w13, self.w2, self.top_k = w13, w2, top_k
        self.activation = activation
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.expert_map = expert_map
        self.block_size = block_size
        self._workspaces = threading.local()

    def _workspace(self, stream: int) -> _Workspace:
        """This thread's buffers for ``stream``; they go when the thread ends."""
        by_stream = getattr(self._workspaces, "by_stream", None)
        if by_stream is None:
            by_stream = self._workspaces.by_stream = {}
        if stream not in by_stream:
            by_stream[stream] = _Workspace()
        return by_stream[stream]

    def __call__(self, x, topk_weights, topk_ids, *, out=None, stream=None):
        shape = tuple(getattr(topk_ids, "shape", ()))
        if len(shape) == 2 and shape[1] != self.top_k:
            raise ValueError(f"MoE: topk_ids has {shape[1]} columns; this layer routes top_k={self.top_k}")
        s = stream_handle(stream)
        return _forward(x, self.w13, self.w2, topk_weights, topk_ids, self.activation,
                        self.apply_router_weight_on_input, self.expert_map, out, s, self.block_size,
                        self._workspace(s))

    # Set by from_pretrained / fm.load_moe_layers: the model's router (a
    # ferrum_moe.router.Router) and its shared expert MLP, if it has one.
    router = None
    shared_expert = None

    @classmethod
    def from_pretrained(cls, path, layer: int, *, backend: str = "auto", device="cpu", dtype: str = "float16",
                        progress: bool = True) -> "MoE":
        """MoE layer ``layer`` of a published GPTQ/AWQ checkpoint directory (see
        fm.load_moe_layers), with its router and shared experts."""
        from .pretrained import load_moe_layers

        return load_moe_layers(path, [layer], backend=backend, device=device, dtype=dtype, progress=progress)[layer]

    def route(self, hidden_states):
        """hidden_states [num_tokens, hidden] -> (topk_weights float32, topk_ids
        int32) [num_tokens, top_k] by the model's own router rule (host numpy;
        numpy, PyTorch and CuPy callers get their own arrays back)."""
        if self.router is None:
            raise ValueError("MoE.route: this layer has no router (only layers from MoE.from_pretrained or "
                             "fm.load_moe_layers have one); pass topk_weights and topk_ids to the layer instead")
        return self.router(hidden_states)

    def forward(self, hidden_states, *, stream=None):
        """The whole layer as the model computes it: route, the routed experts,
        plus the shared experts where the model has them."""
        from .pretrained import forward

        return forward(self, hidden_states, stream)
