"""Checks of scalar arguments shared by the Python API: an int of the right type
and range, or a TypeError/ValueError naming the argument (before any value
reaches the core, whose 64-bit parameters cannot take a larger Python int)."""

from __future__ import annotations

import numpy as np

# Routing arrays hold int32 positions, pair indices and expert ids (the core's kMaxRoutingIndex).
MAX_ROUTING_INDEX = 2**31 - 1
# The routing block of moe_align_block_size and gemm_routed (the core's kMaxBlockSize).
MAX_BLOCK_SIZE = 2**16
# A quantization group's rows (the core's int64 group_size; any size >= K is one group).
MAX_GROUP_SIZE = 2**63 - 1


def checked_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; bools and floats are refused (1.5 is not an index)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if low is not None and high is not None else \
            f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be in {bounds}; got {value}")
    return value
