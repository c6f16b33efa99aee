"""Routing: vLLM's moe_align_block_size contract, with invalid and non-local
experts dropped.

For each local expert in id order, the flat (token, k) pair indices p routed to
it (token = p // top_k), in increasing order, padded to a multiple of
block_size with the sentinel num_tokens * top_k. expert_ids holds each block's
local expert (-1 past the end); num_tokens_post_padded the filled length.

Buffer sizes (``routing_buffer_sizes``): sorted_token_ids holds
num_tokens * top_k + num_local_experts * (block_size - 1) entries (every pair,
plus the worst-case padding of every expert), expert_ids
ceil(that / block_size).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import _core
from ._checks import MAX_BLOCK_SIZE, MAX_ROUTING_INDEX, checked_int
from .arrays import import_array, stream_handle, to_caller
from .discovery import resolve


def routing_buffer_sizes(num_tokens: int, top_k: int, num_local_experts: int, block_size: int) -> tuple[int, int]:
    """(len(sorted_token_ids), len(expert_ids)) for the worst case of this shape.
    Sizes whose positions would not fit the int32 routing arrays are refused."""
    name = "routing_buffer_sizes"
    num_tokens = checked_int(num_tokens, f"{name}: num_tokens", 0)
    top_k = checked_int(top_k, f"{name}: top_k", 1)
    # Local ids are int32, so at most 2^31 of them (0 .. 2^31 - 1).
    num_local_experts = checked_int(num_local_experts, f"{name}: num_local_experts", 0, MAX_ROUTING_INDEX + 1)
    block_size = checked_int(block_size, f"{name}: block_size", 1, MAX_BLOCK_SIZE)
    if num_tokens * top_k > MAX_ROUTING_INDEX:  # the core's check, for products beyond int64 too
        raise ValueError(f"{name}: num_tokens * top_k = {num_tokens * top_k} exceeds 2^31 - 1 (the routing arrays "
                         "hold int32 positions)")
    padded = _core.max_num_tokens_padded(num_tokens * top_k, num_local_experts, block_size)
    return padded, -(-padded // block_size)


@dataclasses.dataclass
class Routing:
    """The output of moe_align_block_size (arrays of any DLPack library)."""

    sorted_token_ids: object
    expert_ids: object
    num_tokens_post_padded: object
    block_size: int
    top_k: int
    num_tokens: int

    def __init__(self, sorted_token_ids, expert_ids, num_tokens_post_padded, *, block_size: int, top_k: int,
                 num_tokens: int):
        self.sorted_token_ids = sorted_token_ids
        self.expert_ids = expert_ids
        self.num_tokens_post_padded = num_tokens_post_padded
        self.block_size = checked_int(block_size, "Routing: block_size", 1, MAX_BLOCK_SIZE)
        self.top_k = checked_int(top_k, "Routing: top_k", 1, MAX_ROUTING_INDEX)
        self.num_tokens = checked_int(num_tokens, "Routing: num_tokens", 0, MAX_ROUTING_INDEX // self.top_k)

    def tensors(self, stream: int = 0):
        """(sorted_token_ids, expert_ids, num_tokens_post_padded) as ferrum Tensors."""
        return (import_array(self.sorted_token_ids, "sorted_token_ids", stream),
                import_array(self.expert_ids, "expert_ids", stream),
                import_array(self.num_tokens_post_padded, "num_tokens_post_padded", stream))


_SMALLEST_DEFAULT_BLOCK, _LARGEST_DEFAULT_BLOCK = 8, 128  # default_block_size's range (_capacities sizes for it)
# The routing block that means no align: each pair is a block of its own and the
# GEMMs read topk_ids themselves (plugin ABI 1.2, pair routing). A layer of one
# token takes it by default; block tables and callers may name it at any count.
PAIR_ROUTING = 0


def default_block_size(num_pairs: int, num_experts: int) -> int:
    """The routing block for the expected pairs per expert: 8 up to 6, 16 under
    16, 32 up to 64, then 128 (the layer asks a measured block table first:
    block_tables.py). The block picks the CUDA backend's tile height;
    the bounds follow a sweep of blocks 8, 16, 32 and 128 over four models at
    M = 4-1024 (H200, 2026-12-04, docs/kernel-notes.md "Block sizes after
    v34"): the 8-row tile up to 6 pairs per expert (DeepSeek-V2-Lite M = 64:
    139 against 145 us on 16-row tiles; at 8 pairs Mixtral M = 32 355 against
    300: each block streams its expert's weights again), 32-row tiles from 16
    (Mixtral M = 64: 403 against 472 us), and 128 (Hopper wgmma tiles) past 64
    (Qwen3-30B-A3B at 64: 555 against 668 us; DeepSeek-V2-Lite at 96: 634
    against 656)."""
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 6:
        return _SMALLEST_DEFAULT_BLOCK
    if per_expert < 16:
        return 16
    return 32 if per_expert <= 64 else _LARGEST_DEFAULT_BLOCK


def align_block(block_size: int, num_pairs: int, num_experts: int) -> int:
    """The block a call aligns at: block_size, or the rule's where that is
    PAIR_ROUTING (a backend without pair routing, or a step that must align)."""
    return default_block_size(num_pairs, num_experts) if block_size == PAIR_ROUTING else block_size


_cached_buffer_sizes = functools.lru_cache(maxsize=256, typed=True)(routing_buffer_sizes)  # a decode step asks the same


@functools.lru_cache(maxsize=256, typed=True)
def _capacities(num_pairs: int, num_local: int, block_size: int, padded: int, blocks: int) -> tuple[int, int]:
    """The sizes a layer's routing buffers are grown to: enough for every
    default block (8-128) at this token count. The padded length grows with the
    block and the block count falls, so a layer that has run at its largest
    count allocates nothing at a smaller one whose block is smaller (what
    CUDA-graph capture needs). Where the largest block's padding would not fit
    the int32 positions, this block's own sizes."""
    largest, smallest = max(block_size, _LARGEST_DEFAULT_BLOCK), min(block_size, _SMALLEST_DEFAULT_BLOCK)
    try:
        most_padded = _core.max_num_tokens_padded(num_pairs, num_local, largest)
    except ValueError:
        return padded, blocks
    return most_padded, -(-_core.max_num_tokens_padded(num_pairs, num_local, smallest) // smallest)


def _routing_buffers(backend, topk_ids_t, block_size, num_experts, map_t, stream, workspace=None):
    """Buffers for align's output (sorted_token_ids, expert_ids,
    num_tokens_post_padded): new ones, or views of ``workspace``'s (a
    moe._Workspace)."""
    num_tokens, top_k = topk_ids_t.shape
    num_local = num_experts
    if map_t is not None and map_t.device[0] == 1:
        host_map = np.from_dlpack(map_t)
        num_local = int(host_map.max(initial=-1)) + 1
    padded, blocks = _cached_buffer_sizes(num_tokens, top_k, num_local, block_size)
    dev = tuple(topk_ids_t.device)
    if workspace is None:
        sorted_ids, expert_ids, post = (backend.empty(dev[0], dev[1], "int32", [n], stream) for n in (padded, blocks, 1))
    else:
        # (The arguments were checked by routing_buffer_sizes above.)
        most_padded, most_blocks = _capacities(num_tokens * top_k, num_local, block_size, padded, blocks)
        sorted_ids, expert_ids, post = (workspace.take(name, backend, dev, "int32", [n], stream, capacity)
                                        for name, n, capacity in (("sorted_token_ids", padded, most_padded),
                                                                  ("expert_ids", blocks, most_blocks),
                                                                  ("post", 1, 1)))
    return sorted_ids, expert_ids, post


def _align(backend, topk_ids_t, block_size, num_experts, map_t, stream, workspace=None):
    """Runs the backend's align into _routing_buffers' buffers; returns them."""
    buffers = _routing_buffers(backend, topk_ids_t, block_size, num_experts, map_t, stream, workspace)
    backend.moe_align_block_size(topk_ids_t, num_experts, block_size, map_t, *buffers, stream)
    return buffers


def moe_align_block_size(topk_ids, block_size: int, num_experts: int, *, expert_map=None, backend: str = "auto",
                         stream=None) -> Routing:
    """Groups the (token, k) pairs of ``topk_ids`` (int32/int64 [num_tokens,
    top_k], global expert ids) by expert in blocks of ``block_size``.

    expert_map: int32 [num_experts], global id -> local id or -1; blocks then
    carry local ids and pairs of non-local experts vanish. Ids < 0 or >=
    num_experts are dropped. Arrays come back as topk_ids' array type, on its
    device.
    """
    block_size = checked_int(block_size, "moe_align_block_size: block_size", 1, MAX_BLOCK_SIZE)
    num_experts = checked_int(num_experts, "moe_align_block_size: num_experts", 1, MAX_ROUTING_INDEX)
    s = stream_handle(stream)
    ids = import_array(topk_ids, "topk_ids", s)
    if len(ids.shape) != 2:
        raise ValueError(f"moe_align_block_size: topk_ids must be [num_tokens, top_k]; got shape {list(ids.shape)}")
    b = resolve(backend, tuple(ids.device))
    map_t = None if expert_map is None else import_array(expert_map, "expert_map", s)
    sorted_ids, expert_ids, post = _align(b, ids, block_size, num_experts, map_t, s)
    return Routing(to_caller(sorted_ids, topk_ids), to_caller(expert_ids, topk_ids), to_caller(post, topk_ids),
                   block_size=block_size, top_k=ids.shape[1], num_tokens=ids.shape[0])
