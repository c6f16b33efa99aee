"""GPTQ weights on the host: the on-disk layout, packing, round-to-nearest
quantization and dequantization.

Orientation: W is [K, N] and y = x @ W. Codes are packed along K: value k of
column n sits in word k // (32 // bits) at bit offset bits * (k % (32 // bits)),
low bits first, words read as unsigned. Zero points (qzeros) are packed the same
way along N. ``checkpoint_format="gptq"`` (v1, the common on-disk form) stores
zero - 1; ``"gptq_v2"`` stores the true zero. Dequantization:
W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n].
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._checks import MAX_GROUP_SIZE

_FORMATS = ("gptq", "gptq_v2")


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits}")
    return 32 // bits


def num_groups(k: int, group_size: int) -> int:
    """ceil(K / G) groups; group_size -1 means one group over all of K."""
    if group_size == -1:
        return 1
    if group_size < 1:
        raise ValueError(f"group_size must be -1 or positive; got {group_size}")
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be at most {MAX_GROUP_SIZE} (any size >= K is one group); got {group_size}")
    return -(-k // group_size)


def pack(q: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Packs codes in [0, 2**bits) along ``axis`` (0: K, GPTQ qweight; 1: N,
    qzeros) into int32 words, low bits first. A partial last word is zero-filled."""
    per = _per_word(bits)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"pack: q must be 2-D; got shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() >= 1 << bits):
        raise ValueError(f"pack: codes must be in [0, {1 << bits}) for {bits}-bit; got [{q.min()}, {q.max()}]")
    q = np.moveaxis(q.astype(np.uint32), axis, 0)
    words = -(-q.shape[0] // per)
    padded = np.zeros((words * per,) + q.shape[1:], np.uint32)
    padded[: q.shape[0]] = q
    lanes = padded.reshape(words, per, *q.shape[1:])
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, per, *([1] * (q.ndim - 1)))
    packed = np.bitwise_or.reduce(lanes << shifts, axis=1)
    return np.ascontiguousarray(np.moveaxis(packed, 0, axis)).view(np.int32)


def unpack(packed: np.ndarray, bits: int, k: int, axis: int = 0) -> np.ndarray:
    """Inverse of pack: the first ``k`` codes along ``axis`` as int32."""
    per = _per_word(bits)
    w = np.moveaxis(np.asarray(packed).view(np.uint32), axis, 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise TypeError(f"unpack: k must be a non-negative int; got {k!r}")
    if k > w.shape[0] * per:
        raise ValueError(f"unpack: k={k} exceeds the {w.shape[0] * per} codes that {w.shape[0]} words of "
                         f"{bits}-bit codes hold along axis {axis}")
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, per, *([1] * (w.ndim - 1)))
    codes = (w[:, None] >> shifts) & np.uint32((1 << bits) - 1)
    codes = codes.reshape(w.shape[0] * per, *w.shape[1:])[:k]
    return np.ascontiguousarray(np.moveaxis(codes.astype(np.int32), 0, axis))


@dataclasses.dataclass(eq=False)
class GPTQWeight:
    """One [K, N] matrix in GPTQ's on-disk layout.

    qweight: int32 [ceil(K / (32/bits)), N]; scales: float [num_groups, N];
    qzeros: int32 [num_groups, ceil(N / (32/bits))] or None (symmetric);
    g_idx: int32 [K] (act-order) or None (row k is in group k // group_size).
    ``k`` is needed only when neither g_idx nor a whole number of words gives K.
    """

    qweight: np.ndarray
    scales: np.ndarray
    qzeros: np.ndarray | None = None
    g_idx: np.ndarray | None = None
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    checkpoint_format: str = "gptq"
    k: int | None = None

    def __post_init__(self):
        for name in ("bits", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)):
                raise TypeError(f"k must be an int or None; got {self.k!r} ({type(self.k).__name__})")
            if self.k < 1:
                raise ValueError(f"k must be positive; got {self.k}")
        per = _per_word(self.bits)
        if self.checkpoint_format not in _FORMATS:
            raise ValueError(f"checkpoint_format must be one of {_FORMATS}; got {self.checkpoint_format!r}")
        qweight = np.asarray(self.qweight)
        if qweight.dtype.kind not in "iu" or qweight.dtype.itemsize != 4:
            raise TypeError(f"qweight must hold int32 words; got dtype {qweight.dtype}")
        self.qweight = np.ascontiguousarray(qweight).view(np.int32)
        if self.qweight.ndim != 2:
            raise ValueError(f"qweight must be 2-D [K/{per}, N]; got shape {self.qweight.shape}")
        if self.g_idx is not None:
            g_idx = np.asarray(self.g_idx)
            if g_idx.dtype.kind not in "iu":
                raise TypeError(f"g_idx must hold integer group indices; got dtype {g_idx.dtype}")
            if g_idx.ndim != 1:
                raise ValueError(f"g_idx must be 1-D [K]; got shape {g_idx.shape}")
            self.g_idx = np.ascontiguousarray(g_idx, dtype=np.int32)
            length = self.g_idx.shape[0]
            if self.k is not None and self.k != length:
                raise ValueError(f"g_idx has length {length}; k={self.k} was given (g_idx holds one group per input row)")
            rows = self.qweight.shape[0]
            if -(-length // per) != rows:
                raise ValueError(f"g_idx has length {length}; qweight's {rows} packed rows hold K in "
                                 f"[{(rows - 1) * per + 1}, {rows * per}] (g_idx holds one group per input row)")
            self.k = length
        if self.k is None:
            self.k = self.qweight.shape[0] * per
        if -(-self.k // per) != self.qweight.shape[0]:
            raise ValueError(f"qweight has {self.qweight.shape[0]} packed rows; K={self.k} needs {-(-self.k // per)}")
        groups = num_groups(self.k, self.group_size)
        self.scales = np.asarray(self.scales)
        if self.scales.shape != (groups, self.n):
            raise ValueError(f"scales must be [num_groups={groups}, N={self.n}]; got shape {self.scales.shape}")
        if self.qzeros is None and not self.sym:
            raise ValueError("qzeros is required when sym=False (asymmetric weights carry their zero points); got None")
        if self.qzeros is not None:
            qzeros = np.asarray(self.qzeros)
            if qzeros.dtype.kind not in "iu" or qzeros.dtype.itemsize != 4:
                raise TypeError(f"qzeros must hold int32 words; got dtype {qzeros.dtype}")
            self.qzeros = np.ascontiguousarray(qzeros).view(np.int32)
            want = (groups, -(-self.n // per))
            if self.qzeros.shape != want:
                raise ValueError(f"qzeros must be {list(want)} (packed along N); got shape {self.qzeros.shape}")
        if self.g_idx is not None and self.g_idx.size and (self.g_idx.min() < 0 or self.g_idx.max() >= groups):
            raise ValueError(f"g_idx values must be in [0, {groups}); got [{self.g_idx.min()}, {self.g_idx.max()}]")

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def num_groups(self) -> int:
        return num_groups(self.k, self.group_size)

    def codes(self) -> np.ndarray:
        """int32 [K, N] unpacked codes."""
        return unpack(self.qweight, self.bits, self.k)

    def zeros(self) -> np.ndarray:
        """int32 [num_groups, N] true zero points."""
        if self.qzeros is None:
            return np.full((self.num_groups, self.n), 1 << (self.bits - 1), np.int32)
        stored = unpack(self.qzeros, self.bits, self.n, axis=1)
        return stored + 1 if self.checkpoint_format == "gptq" else stored

    def group_index(self) -> np.ndarray:
        """int32 [K]: the group of each input row."""
        if self.g_idx is not None:
            return self.g_idx
        if self.group_size == -1:
            return np.zeros(self.k, np.int32)
        return (np.arange(self.k) // self.group_size).astype(np.int32)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """[K, N] float: (q - z[g_idx[k]]) * s[g_idx[k]]."""
        g = self.group_index()
        s = self.scales.astype(np.float64)[g]
        z = self.zeros()[g]
        return ((self.codes() - z) * s).astype(dtype)


def unstack(qweight, scales, qzeros=None, g_idx=None, *, bits: int = 4, group_size: int = 128, sym: bool = True,
            checkpoint_format: str = "gptq", k: int | None = None) -> list[GPTQWeight]:
    """Per-expert GPTQWeights (views, no copy) of arrays stacked along a leading
    expert axis: qweight [E, K/(32/bits), N], scales [E, G, N], qzeros
    [E, G, N/(32/bits)] or None, g_idx [E, K] or None."""
    qweight, scales = np.asarray(qweight), np.asarray(scales)
    if qweight.ndim != 3 or scales.ndim != 3 or scales.shape[0] != qweight.shape[0]:
        raise ValueError(
            f"unstack: qweight must be [E, K/{32 // bits}, N] and scales [E, G, N] with the same E; "
            f"got shapes {qweight.shape} and {scales.shape}"
        )
    e = qweight.shape[0]
    for name, a, rank in (("qzeros", qzeros, 3), ("g_idx", g_idx, 2)):
        if a is not None and (np.ndim(a) != rank or np.shape(a)[0] != e):
            raise ValueError(f"unstack: {name} must have {rank} dimensions with E={e} first; got shape {np.shape(a)}")
    return [GPTQWeight(qweight[i], scales[i], None if qzeros is None else np.asarray(qzeros)[i],
                       None if g_idx is None else np.asarray(g_idx)[i], bits=bits, group_size=group_size, sym=sym,
                       checkpoint_format=checkpoint_format, k=k) for i in range(e)]


def _round_up(s, dtype):
    """``s`` (positive float64) in ``dtype``, rounded up where rounding to nearest
    would land below it: a scale stored smaller than computed would clip the
    group's extreme codes by up to maxq times the rounding error (float16
    subnormals round by up to 2**-25, so a constant group of -1e-3 clipped by
    2.9e-6 against a half step of 2.3e-6)."""
    with np.errstate(over="ignore"):  # too large for dtype: inf, which quantize() names
        stored = s.astype(dtype)
    up = np.nextafter(stored, np.array(np.inf, dtype))
    return np.where(stored.astype(np.float64) < s, up, stored).astype(dtype)


def quantize(w_kn, bits: int = 4, group_size: int = 128, sym: bool = True, *, g_idx=None,
             checkpoint_format: str = "gptq", scale_dtype=np.float16) -> GPTQWeight:
    """Round-to-nearest quantization of a float [K, N] matrix (y = x @ W).

    Per group and column. sym: zero = 2**(bits-1), scale = max|w| / (2**(bits-1) - 1);
    asym: scale = (max - min) / (2**bits - 1) over a range that includes 0,
    zero = round(-min / scale); in the v1 format, which cannot store a zero of 0,
    a group with no negative weight gets zero 1 and scale max / (2**bits - 2).
    Scales are rounded up to ``scale_dtype`` so the stored range still covers the
    group, and every dequantized weight is within half a step of the original.
    Codes are rounded against the scales as stored (``scale_dtype``), so
    dequantize() is exactly what a kernel computes.
    ``g_idx`` (int [K]) assigns rows to groups (act-order); by default row k is in
    group k // group_size.
    """
    w = np.asarray(w_kn, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"quantize: w must be 2-D [K, N]; got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"quantize: w must be finite; got {np.count_nonzero(~np.isfinite(w))} inf or NaN values")
    k, n = w.shape
    _per_word(bits)
    groups = num_groups(k, group_size)
    gi = (np.zeros(k, np.int32) if group_size == -1 else (np.arange(k) // group_size).astype(np.int32)) \
        if g_idx is None else np.asarray(g_idx, np.int32)
    maxq = (1 << bits) - 1
    # Per-group column extremes: contiguous groups reduce in one pass, act-order
    # groups (any g_idx) by sorting rows into group order first.
    order = np.argsort(gi, kind="stable") if g_idx is not None else np.arange(k)
    sorted_g = gi[order]
    starts = np.flatnonzero(np.r_[True, sorted_g[1:] != sorted_g[:-1]])
    present = sorted_g[starts]
    ws = w[order]
    lo = np.zeros((groups, n))
    hi = np.zeros((groups, n))
    lo[present] = np.minimum.reduceat(ws, starts, axis=0)
    hi[present] = np.maximum.reduceat(ws, starts, axis=0)
    zeros = np.full((groups, n), 1 << (bits - 1), np.int64)
    if sym:
        s = np.maximum(np.abs(lo), np.abs(hi)) / ((1 << (bits - 1)) - 1)
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s = (hi - lo) / maxq
        zeros = np.clip(np.round(-lo / np.where(s == 0, 1, s)), 0, maxq).astype(np.int64)
        if checkpoint_format == "gptq":
            # v1 stores zero - 1 in `bits` bits, so a zero of 0 cannot be stored.
            # That happens when a group has no negative weight: put the zero at 1
            # instead and spread [0, hi] over the maxq - 1 codes above it, so every
            # weight still rounds to within half a step.
            at_zero = zeros == 0
            s = np.where(at_zero, hi / (maxq - 1), s)
            zeros = np.where(at_zero, 1, zeros)
    if checkpoint_format not in _FORMATS:
        raise ValueError(f"checkpoint_format must be one of {_FORMATS}; got {checkpoint_format!r}")
    s = np.where(s == 0, 1.0, s)
    scales = _round_up(s, scale_dtype)  # quantize against the scales actually stored
    if not np.all(np.isfinite(scales.astype(np.float64))):
        raise ValueError(f"quantize: w's scales must fit {np.dtype(scale_dtype).name}; "
                         f"got max|w| = {float(np.max(np.abs(w))):g}")
    s_k = scales.astype(np.float64)[gi]
    q = np.clip(np.round(w / s_k) + zeros[gi], 0, maxq).astype(np.int32)
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    # GPTQ checkpoints carry qzeros for symmetric weights too (v1: 0x77777777 for 4-bit).
    qzeros = pack(stored, bits, axis=1)
    return GPTQWeight(pack(q, bits), scales, qzeros, None if g_idx is None else gi, bits=bits,
                      group_size=group_size, sym=sym, checkpoint_format=checkpoint_format, k=k)
