"""Expert stacks and Linear views: the Python face of ferrum::ExpertStack."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import _core
from ._checks import checked_int
from .arrays import host_array, host_copy, import_array, import_output, stream_handle, to_caller
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
    elif not hasattr(weights, "__iter__"):
        raise TypeError("weights: expected a GPTQWeight, a sequence of them (one per expert) or a dict of stacked "
                        f"arrays; got {type(weights).__name__}")
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


_FACTS = ("num_experts", "k", "n_per_expert", "bits", "group_size", "dtype", "column_alignment", "resident_bytes")


class ExpertStack:
    """E experts of one matmul role (w13 = [gate | up] along N, or w2), each
    W_e [K, n_per_expert], quantized, held by one backend on one device."""

    def __init__(self, core: _core.ExpertStack):
        self._core = core
        # A stack never changes: its facts are read from the core once, not
        # through a binding on every call (a layer call asks for a dozen).
        self._backend = core.backend  # the _core.Backend
        self._device = tuple(core.device)  # (DLDevice type, id)
        self._backend_description = self._backend.description
        self._facts = {name: getattr(core, name) for name in _FACTS}
        self._facts.update(backend=self._backend.name, device=device_name(self._device))

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
        if zeros.max() > 255:
            # Only 8-bit v1 gets here: its stored zero - 1 of 0xFF means 256.
            i = int(np.argmax(zeros.reshape(len(weights), -1).max(axis=1) > 255))
            raise ValueError(
                f"weights[{i}].qzeros: a stored 8-bit v1 zero of 0xFF means a zero point of 256, outside the "
                "[0, 255] that backends hold (zero points are uint8); such a checkpoint is not supported")
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

    num_experts = property(lambda self: self._facts["num_experts"])
    k = property(lambda self: self._facts["k"])
    n_per_expert = property(lambda self: self._facts["n_per_expert"])
    bits = property(lambda self: self._facts["bits"])
    group_size = property(lambda self: self._facts["group_size"])
    dtype = property(lambda self: self._facts["dtype"])
    backend = property(lambda self: self._facts["backend"])
    device = property(lambda self: self._facts["device"])
    column_alignment = property(lambda self: self._facts["column_alignment"])
    resident_bytes = property(lambda self: self._facts["resident_bytes"])

    def __repr__(self) -> str:
        return (f"ExpertStack(num_experts={self.num_experts}, k={self.k}, n_per_expert={self.n_per_expert}, "
                f"bits={self.bits}, group_size={self.group_size}, dtype={self.dtype}, backend={self.backend!r}, "
                f"device={self.device!r})")

    def _empty(self, shape, dtype: str, stream: int, zeroed: bool = False, temporary: bool = False) -> _core.Tensor:
        dev = self._device
        return self._backend.empty(dev[0], dev[1], dtype, list(shape), stream, temporary=temporary, zeroed=zeroed)

    def gemm_batched(self, x, dispatches, *, out=None, stream=None):
        """For each dispatch row (expert, in_row, out_row, m):
        out[out_row:out_row+m, :n] = x[in_row:in_row+m, :k] @ W_expert.

        x: [rows_in, k] in the stack's dtype, on its device. dispatches: int
        [D, 4], on the host (a list or any host array: every row is checked) or
        on the stack's device (int32/int64 from any DLPack library: the kernels
        read it, and rows whose expert, rows or m are out of range are skipped;
        with ``out=`` the host never reads it, so a captured call replays with
        new contents). out: [rows_out, >= n_per_expert] in the stack's dtype or
        float32, sharing no memory with x; rows no dispatch names are left as
        they were. Returns out, or a new zero-filled array of x's type with
        max(out_row + m) rows (for a device table the host then reads it to
        learn the height; every host row is checked before it is allocated).
        """
        s = stream_handle(stream)
        xt = import_array(x, "x", s)
        ot = import_output(out, "out", s) if out is not None else None
        dt, rows = _dispatch_table(self._core, dispatches, xt, ot is None, s)
        if ot is None:
            ot = self._empty([rows, self.n_per_expert], self.dtype, s, zeroed=True)
        self._core.gemm_batched(xt, dt, 0, self.n_per_expert, None, ot, s)
        return out if out is not None else to_caller(ot, x)

    def gemm_routed(self, x, routing, *, topk_weights=None, activation=None, out=None, stream=None):
        """vLLM's fused-MoE GEMM over moe_align_block_size output. For each valid
        sorted id p: y[p] = x[p // top_k] @ W_{expert of p's block}
        (* topk_weights.flat[p]), and out[p] = y[p], or with ``activation="silu"``
        (a w13 stack, [gate | up] along an even n_per_expert)
        out[p] = silu(y[p, :n/2]) * y[p, n/2:], which a backend may compute in
        the GEMM's epilogue (plugin ABI 1.3) instead of a pass of its own.

        x: [num_tokens, k]; topk_weights: float32 [num_tokens, top_k]; out:
        [num_tokens * top_k, n_per_expert] (n_per_expert / 2 with an activation),
        stack dtype or float32 (stack dtype with an activation), sharing no
        memory with the inputs. Rows of pairs routed to no local expert are left
        as they were in ``out``, zero in a new result (with an activation, rows
        of a given ``out`` may be overwritten with silu(0) * 0 = 0). With
        pairs = num_tokens * top_k, only the first min(pairs, ceil(pairs /
        block_size) + min(num_experts, pairs)) routing blocks are read
        (moe_align_block_size never fills more). Returns out, or a new
        zero-filled array of x's type.
        """
        from .routing import Routing

        if not isinstance(routing, Routing):
            raise TypeError(f"routing: expected fm.Routing (from fm.moe_align_block_size); got {type(routing).__name__}")
        if activation not in (None, "silu"):
            raise ValueError(f"gemm_routed: activation must be None or 'silu'; got {activation!r}")
        if activation is not None and self.n_per_expert % 2:
            raise ValueError(f"gemm_routed: activation needs an even n_per_expert ([gate | up]); this stack has "
                             f"{self.n_per_expert}")
        s = stream_handle(stream)
        xt = import_array(x, "x", s)
        if xt.shape[0] != routing.num_tokens:
            raise ValueError(f"gemm_routed: x has {xt.shape[0]} rows; the routing was built for {routing.num_tokens} tokens")
        pairs = routing.num_tokens * routing.top_k
        width = self.n_per_expert if activation is None else self.n_per_expert // 2
        ot = import_output(out, "out", s) if out is not None else self._empty([pairs, width], self.dtype, s, zeroed=True)
        tw = None if topk_weights is None else import_array(topk_weights, "topk_weights", s)
        r = routing.tensors(s)
        args = (xt, r[0], r[1], r[2], routing.block_size, routing.top_k, tw)
        if activation is None:
            self._core.gemm_routed(*args, ot, s)
        elif not self._core.gemm_routed(*args, None, s, gated_out=ot):
            # The backend has no gated epilogue for this call: y, then the activation.
            y = self._empty([pairs, self.n_per_expert], self.dtype, s, zeroed=True, temporary=True)
            self._core.gemm_routed(*args, y, s)
            self._backend.gated_activation(y, ot, s)
        return out if out is not None else to_caller(ot, x)

    def zero_workspace(self, stream=None) -> None:
        """Resets whatever cross-block state the backend keeps between GEMMs."""
        self._core.zero_workspace(stream_handle(stream))

    def expert(self, e: int, *, bias=None) -> "Linear":
        """Expert ``e`` as a Linear view (no copy)."""
        e = checked_int(e, "expert: e")
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert: e={e} is out of range for a stack of {self.num_experts} experts")
        return Linear(self, e * self.n_per_expert, self.n_per_expert, bias)

    def expert_linear(self, offset: int, n: int, *, bias=None) -> "Linear":
        """Columns [offset, offset + n) of the stacked N (num_experts x
        n_per_expert) as a Linear view (no copy). The window may cross expert
        boundaries (a projection stored across neighbouring expert slots); each
        end is a multiple of the backend's column_alignment or an expert
        boundary."""
        offset, n = checked_int(offset, "expert_linear: offset"), checked_int(n, "expert_linear: n")
        self._core.check_view(offset, n, "expert_linear")
        return Linear(self, offset, n, bias)


def _dispatch_table(core: _core.ExpertStack, dispatches, xt: _core.Tensor, need_rows: bool, stream: int):
    """(dispatch Tensor, output height). A table on a device is passed as it is
    (the kernels check its rows); anything else becomes a host int64 [D, 4]
    array (the core checks every row). The height, max(out_row + m), is
    computed only when the caller gave no ``out``: for a host table by the
    core, which names a bad row before anything is allocated; for a device
    table over the rows a kernel would run (that is the one host read of it),
    so a row the kernel skips cannot ask for a huge allocation."""
    on_device = hasattr(dispatches, "__dlpack_device__") and not isinstance(dispatches, np.ndarray) and \
        int(dispatches.__dlpack_device__()[0]) != 1
    if not on_device:
        d = host_array(dispatches, "dispatches", np.int64)
        if d.ndim == 1 and d.size in (0, 4):  # one row, or none
            d = d.reshape(-1, 4)
        table = import_array(d, "dispatches")
        return table, core.batched_output_rows(xt, table) if need_rows else 0
    table = import_array(dispatches, "dispatches", stream)
    if not need_rows:
        return table, 0
    d = host_copy(dispatches, "dispatches")
    if d.ndim != 2 or d.shape[1] != 4 or d.shape[0] == 0 or d.dtype.kind not in "iu":
        return table, 0
    num_experts = core.num_experts
    e, in_row, out_row, m = (d[:, i].astype(np.int64) for i in range(4))
    x_rows = xt.shape[0] if len(xt.shape) == 2 else 0
    # Differences, not sums: hostile rows near 2**63 must not wrap.
    runs = (e >= 0) & (e < num_experts) & (m > 0) & (in_row >= 0) & (in_row <= x_rows) & (m <= x_rows - in_row) & \
        (out_row >= 0) & (out_row <= np.iinfo(np.int64).max - np.maximum(m, 0))
    return table, int((out_row + m)[runs].max(initial=0))


class Linear:
    """y = x @ W_stacked[:, offset:offset + n] (+ bias): columns of a stack's
    stacked N (one expert's, or a window across neighbouring experts), as a view."""

    def __init__(self, stack: ExpertStack, offset: int, n: int, bias=None):
        self._stack = stack
        self._offset = offset
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
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"stacked columns=[{self._offset}, {self._offset + self._n}), bias={self._bias is not None})")

    def __call__(self, x, *, out=None, stream=None):
        """x: [M, in_features] -> [M, out_features] (out: stack dtype or float32)."""
        s = stream_handle(stream)
        xt = import_array(x, "x", s)
        if len(xt.shape) != 2:
            raise ValueError(f"Linear: x must be [M, in_features={self.in_features}]; got shape {list(xt.shape)}")
        ot = import_output(out, "out", s) if out is not None else \
            self._stack._empty([xt.shape[0], self._n], self._stack.dtype, s)
        self._stack._core.linear(xt, self._offset, self._n, self._bias, ot, s)
        return out if out is not None else to_caller(ot, x)
