"""AWQ checkpoints: qweight [K, N/8] packed along N in the interleaved nibble
order 0, 2, 4, 6, 1, 3, 5, 7 (slot i of a word holds column 8j + ORDER[i]),
qzeros [num_groups, N/8] packed the same way (true zeros), scales [num_groups, N]."""

from __future__ import annotations

import numpy as np

from .gptq import GPTQWeight, pack

ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [R, N/8] AWQ words -> int32 [R, N] codes in column order."""
    words = np.asarray(packed).view(np.uint32)
    slots = (words[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & np.uint32(0xF)  # [R, N/8, slot]
    codes = np.empty_like(slots)
    codes[:, :, ORDER] = slots
    return codes.reshape(words.shape[0], -1).astype(np.int32)


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """int [R, N] codes -> int32 [R, N/8] AWQ words (the inverse of unpack_awq)."""
    c = np.asarray(codes).astype(np.uint32).reshape(codes.shape[0], -1, 8)[:, :, ORDER]
    return np.bitwise_or.reduce(c << (np.arange(8, dtype=np.uint32) * 4), axis=2).view(np.int32)


def to_gptq(qweight, qzeros, scales, group_size: int) -> GPTQWeight:
    """An AWQ (4-bit, asymmetric) matrix in GPTQ layout: codes repacked along K,
    zeros stored true (checkpoint_format="gptq_v2"). Exact: no value changes."""
    qweight = np.asarray(qweight)
    if qweight.ndim != 2:
        raise ValueError(f"to_gptq: qweight must be 2-D [K, N/8]; got shape {qweight.shape}")
    codes = unpack_awq(qweight)
    zeros = unpack_awq(qzeros)
    return GPTQWeight(pack(codes, 4), np.asarray(scales), pack(zeros, 4, axis=1), None, bits=4,
                      group_size=group_size, sym=False, checkpoint_format="gptq_v2", k=codes.shape[0])
