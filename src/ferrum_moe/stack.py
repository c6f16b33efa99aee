"""Expert stacks and Linear views: the Python face of ferrum::ExpertStack."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import _core
from .arrays import host_array, import_array, import_output, stream_handle, to_caller
from .discovery import device_name, parse_device, resolve
from .gptq import GPTQWeight

_DTYPES = ("float32", "float16", "bfloat16")


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _check_dtype(dtype) -> str:
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))
    name = name.replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}; got {dtype!r}")
    return name


def _stack_weights(weights) -> tuple[list[GPTQWeight], int, int, int, int]:
    if isinstance(weights, GPTQWeight):
        weights = [weights]
    elif isinstance(weights, dict):  # stacked arrays, as a checkpoint loader produces them
        from .gptq import unstack

        weights = unstack(**weights)
    weights = list(weights)
    if not weights:
        raise ValueError("weights: expected at least one expert's GPTQWeight; got an empty list")
    for i, w in enumerate(weights):
        if not isinstance(w, GPTQWeight):
            raise TypeError(f"weights[{i}]: expected a GPTQWeight; got {type(w).__name__}")
    first = weights[0]
    for i, w in enumerate(weights[1:], 1):
        if (w.k, w.n, w.bits, w.group_size) != (first.k, first.n, first.bits, first.group_size):
            raise ValueError(
                f"weights[{i}] is K={w.k}, N={w.n}, {w.bits}-bit, group {w.group_size}; "
                f"weights[0] is K={first.k}, N={first.n}, {first.bits}-bit, group {first.group_size}: "
                "every expert of a stack must match"
            )
    return weights, first.k, first.n, first.bits, first.group_size


class ExpertStack:
    """E experts of one matmul role (w13 = [gate | up] along N, or w2), each
    W_e [K, n_per_expert], quantized, held by one backend on one device."""

    def __init__(self, core: _core.ExpertStack):
        self._core = core

    @classmethod
    def from_gptq(cls, weights: Sequence[GPTQWeight] | GPTQWeight, *, backend: str = "auto",
                  device="cpu", dtype="float16", stream=None) -> "ExpertStack":
        """Loads GPTQ weights: a list with one GPTQWeight per expert, or a dict of
        arrays stacked along a leading expert axis (the arguments of
        ``fm.gptq.unstack``: qweight [E, K/(32/bits), N], scales [E, G, N],
        optional qzeros and g_idx, bits, group_size, sym, checkpoint_format).
        The backend repacks them into its own layout; the arrays are not kept."""
        weights, k, n, bits, group_size = _stack_weights(weights)
        dtype = _check_dtype(dtype)
        dev = parse_device(device)
        b = resolve(backend, dev)
        qweight = np.stack([w.qweight for w in weights])
        scales = np.stack([np.asarray(w.scales, dtype=np.float32) for w in weights]).astype(_numpy_dtype(dtype))
        zeros = np.stack([w.zeros() for w in weights])
        sym_zero = 1 << (bits - 1)
        zeros = None if np.all(zeros == sym_zero) else zeros.astype(np.uint8)
        g_idx = None
        if any(w.g_idx is not None for w in weights):
            g_idx = np.stack([w.group_index() for w in weights]).astype(np.int32)
        s = stream_handle(stream)
        core = b.create_stack(
            dev[0], dev[1], dtype, len(weights), k, n, bits, group_size,
            import_array(qweight, "qweight"), import_array(scales, "scales"),
            None if zeros is None else import_array(zeros, "zeros"),
            None if g_idx is None else import_array(g_idx, "g_idx"), s,
        )
        return cls(core)

    num_experts = property(lambda self: self._core.num_experts)
    k = property(lambda self: self._core.k)
    n_per_expert = property(lambda self: self._core.n_per_expert)
    bits = property(lambda self: self._core.bits)
    group_size = property(lambda self: self._core.group_size)
    dtype = property(lambda self: self._core.dtype)
    backend = property(lambda self: self._core.backend.name)
    device = property(lambda self: device_name(tuple(self._core.device)))
    column_alignment = property(lambda self: self._core.column_alignment)
    resident_bytes = property(lambda self: self._core.resident_bytes)

    def __repr__(self) -> str:
        return (f"ExpertStack(num_experts={self.num_experts}, k={self.k}, n_per_expert={self.n_per_expert}, "
                f"bits={self.bits}, group_size={self.group_size}, dtype={self.dtype}, backend={self.backend!r}, "
                f"device={self.device!r})")

    def _empty(self, shape, dtype: str, stream: int) -> _core.Tensor:
        dev = tuple(self._core.device)
        return self._core.backend.empty(dev[0], dev[1], dtype, list(shape), stream)

    def gemm_batched(self, x, dispatches, *, out=None, stream=None):
        """For each dispatch row (expert, in_row, out_row, m):
        out[out_row:out_row+m, :n] = x[in_row:in_row+m, :k] @ W_expert.

        x: [rows_in, k] in the stack's dtype, on its device. dispatches: host
        int [D, 4]. out: [rows_out, >= n_per_expert] in the stack's dtype or
        float32; rows no dispatch names are left as they were. Returns out, or a
        new array of x's type with max(out_row + m) rows.
        """
        return self._gemm_window(x, dispatches, 0, self.n_per_expert, None, out, stream)

    def _gemm_window(self, x, dispatches, col_begin, n, bias, out, stream, xt=None):
        s = stream_handle(stream)
        xt = xt if xt is not None else import_array(x, "x", s)
        d = host_array(dispatches, "dispatches", np.int64)
        if d.ndim == 1 and d.size in (0, 4):  # one row, or none
            d = d.reshape(-1, 4)
        ot = None
        if out is not None:
            ot = import_output(out, "out", s)
        else:
            rows = int((d[:, 2] + d[:, 3]).max()) if d.ndim == 2 and d.shape[1] == 4 and d.shape[0] else 0
            ot = self._empty([max(rows, 0), n], self.dtype, s)
        self._core.gemm_batched(xt, import_array(d, "dispatches"), col_begin, n, bias, ot, s)
        return out if out is not None else to_caller(ot, x)

    def gemm_routed(self, x, routing, *, topk_weights=None, out=None, stream=None):
        """vLLM's fused-MoE GEMM over moe_align_block_size output. For each valid
        sorted id p: out[p] = x[p // top_k] @ W_{expert of p's block}
        (* topk_weights.flat[p]).

        x: [num_tokens, k]; topk_weights: float32 [num_tokens, top_k]; out:
        [num_tokens * top_k, n_per_expert], stack dtype or float32. Rows of pairs
        routed to no local expert are left as they were. Only the first
        num_tokens * top_k routing blocks are read (moe_align_block_size never
        fills more). Returns out, or a new array of x's type.
        """
        from .routing import Routing

        if not isinstance(routing, Routing):
            raise TypeError(f"routing: expected fm.Routing (from fm.moe_align_block_size); got {type(routing).__name__}")
        s = stream_handle(stream)
        xt = import_array(x, "x", s)
        if xt.shape[0] != routing.num_tokens:
            raise ValueError(f"gemm_routed: x has {xt.shape[0]} rows; the routing was built for {routing.num_tokens} tokens")
        ot = import_output(out, "out", s) if out is not None else \
            self._empty([routing.num_tokens * routing.top_k, self.n_per_expert], self.dtype, s)
        tw = None if topk_weights is None else import_array(topk_weights, "topk_weights", s)
        r = routing.tensors(s)
        self._core.gemm_routed(xt, r[0], r[1], r[2], routing.block_size, routing.top_k, tw, ot, s)
        return out if out is not None else to_caller(ot, x)

    def zero_workspace(self, stream=None) -> None:
        """Resets whatever cross-block state the backend keeps between GEMMs."""
        self._core.zero_workspace(stream_handle(stream))

    def expert(self, e: int, *, bias=None) -> "Linear":
        """Expert ``e`` as a Linear view (no copy)."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert: e={e} is out of range for a stack of {self.num_experts} experts")
        return Linear(self, e, 0, self.n_per_expert, bias)

    def expert_linear(self, offset: int, n: int, *, bias=None) -> "Linear":
        """Columns [offset, offset + n) of the stacked N (num_experts x
        n_per_expert) as a Linear view (no copy). The window lies inside one
        expert and its ends are multiples of the backend's column_alignment."""
        stacked = self.num_experts * self.n_per_expert
        if offset < 0 or n < 1 or offset + n > stacked:
            raise ValueError(
                f"expert_linear: offset {offset} + n {n} exceeds the stacked N of {stacked} "
                f"({self.num_experts} experts x {self.n_per_expert})"
            )
        e, col = divmod(offset, self.n_per_expert)
        if col + n > self.n_per_expert:
            raise ValueError(
                f"expert_linear: offset {offset} + n {n} crosses from expert {e} into expert {e + 1} "
                f"(n_per_expert {self.n_per_expert}, stacked N {stacked}); a view lies inside one expert"
            )
        self._core.check_column_window(col, n, "expert_linear")
        return Linear(self, e, col, n, bias)


class Linear:
    """y = x @ W[:, window] (+ bias): one expert's columns of a stack, as a view."""

    def __init__(self, stack: ExpertStack, expert: int, col_begin: int, n: int, bias=None):
        self._stack = stack
        self._expert = expert
        self._col_begin = col_begin
        self._n = n
        self._bias = None
        if bias is not None:
            if isinstance(bias, np.ndarray):
                bias = np.ascontiguousarray(bias, dtype=_numpy_dtype(stack.dtype))
            self._bias_ref = bias  # keeps the caller's buffer alive
            self._bias = import_array(bias, "bias")

    @classmethod
    def from_gptq(cls, weight: GPTQWeight, *, bias=None, backend: str = "auto", device="cpu",
                  dtype="float16") -> "Linear":
        return ExpertStack.from_gptq([weight], backend=backend, device=device, dtype=dtype).expert(0, bias=bias)

    @property
    def in_features(self) -> int:
        return self._stack.k

    @property
    def out_features(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, expert={self._expert}, "
                f"columns=[{self._col_begin}, {self._col_begin + self._n}), bias={self._bias is not None})")

    def __call__(self, x, *, out=None, stream=None):
        """x: [M, in_features] -> [M, out_features] (out: stack dtype or float32)."""
        xt = import_array(x, "x", stream_handle(stream))
        if len(xt.shape) != 2:
            raise ValueError(f"Linear: x must be [M, in_features={self.in_features}]; got shape {list(xt.shape)}")
        d = np.array([[self._expert, 0, 0, xt.shape[0]]], np.int64)
        return self._stack._gemm_window(x, d, self._col_begin, self._n, self._bias, out, stream, xt)
