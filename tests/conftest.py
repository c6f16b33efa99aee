"""Shared helpers: fresh random inputs, float64 references, poisoned outputs."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import ferrum_moe as fm

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Relative error bounds against float64: float32 accumulates exactly enough to
# land far below 1e-5; a 16-bit output rounds each element by 2^-11 (float16) or
# 2^-8 (bfloat16), plus the rounding of intermediates in a whole layer.
REL_TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed so a failure can be replayed
    with FERRUM_MOE_TEST_SEED."""
    seed = int(os.environ.get("FERRUM_MOE_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed} for {request.node.name}")
    return np.random.default_rng(seed)


def random_weight(rng, k, n, *, bits=4, group_size=128, sym=True, act_order=False, dtype="float16",
                  checkpoint_format="gptq") -> fm.GPTQWeight:
    """A GPTQ matrix quantized from random floats; scales stored in ``dtype`` so
    dequantize() is exactly what a kernel computing in that dtype sees."""
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    g_idx = None
    if act_order:
        groups = fm.gptq.num_groups(k, group_size)
        g_idx = (rng.permutation(k) * groups // k).astype(np.int32)  # every group, shuffled rows
    return fm.gptq.quantize(w, bits, group_size, sym, g_idx=g_idx, checkpoint_format=checkpoint_format,
                            scale_dtype=NUMPY_DTYPES[dtype])


def random_activations(rng, shape, dtype: str) -> np.ndarray:
    return rng.standard_normal(shape).astype(NUMPY_DTYPES[dtype])


def as64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a).astype(np.float64)


def rel_error(out, ref) -> float:
    out, ref = as64(out), as64(ref)
    assert np.all(np.isfinite(out)), "output holds NaN/Inf (an unwritten or poisoned element?)"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def poisoned(shape, dtype: str) -> np.ndarray:
    """An output buffer full of NaN: any element the kernel fails to write shows."""
    return np.full(shape, np.nan, dtype=NUMPY_DTYPES[dtype])


def reference_moe(x, w13, w2, topk_weights, topk_ids, *, expert_map=None, num_experts=None,
                  on_input=False) -> np.ndarray:
    """float64 MoE layer on dequantized weights, a plain loop over (token, k)."""
    x = as64(x)
    topk_ids, topk_weights = np.asarray(topk_ids), np.asarray(topk_weights, np.float64)
    inter = w2[0].k
    out = np.zeros((x.shape[0], w2[0].n))
    n_global = num_experts if num_experts is not None else len(w13)
    dense = {}
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            g = int(topk_ids[t, j])
            if not 0 <= g < n_global:
                continue
            e = g if expert_map is None else int(expert_map[g])
            if e < 0:
                continue
            if e not in dense:
                dense[e] = (w13[e].dequantize(np.float64), w2[e].dequantize(np.float64))
            h = x[t] @ dense[e][0]
            if on_input:
                h = h * topk_weights[t, j]
            act = h[:inter] / (1 + np.exp(-h[:inter])) * h[inter:]
            y = act @ dense[e][1]
            out[t] += y if on_input else topk_weights[t, j] * y
    return out


def reference_align(topk_ids, block_size, num_experts, expert_map=None):
    """moe_align_block_size by its definition: (sorted ids, expert ids, total)."""
    flat = np.asarray(topk_ids).reshape(-1).astype(np.int64)
    valid = (flat >= 0) & (flat < num_experts)
    local = np.full(flat.size, -1)
    mapping = np.arange(num_experts) if expert_map is None else np.asarray(expert_map)
    local[valid] = mapping[flat[valid]]
    num_local = int(mapping.max(initial=-1)) + 1
    sorted_ids, expert_ids = [], []
    for e in range(num_local):
        pairs = np.flatnonzero(local == e).tolist()
        if not pairs:
            continue
        padded = -(-len(pairs) // block_size) * block_size
        sorted_ids += pairs + [flat.size] * (padded - len(pairs))
        expert_ids += [e] * (padded // block_size)
    return sorted_ids, expert_ids, len(sorted_ids)


class Target:
    """Where a test runs: a backend, a device, and the array library its inputs
    come from (results must come back as that library's arrays)."""

    def __init__(self, backend: str, device: str, library: str, dtypes):
        self.backend, self.device, self.library, self.dtypes = backend, device, library, dtypes

    def __repr__(self):
        return f"{self.backend}-{self.library}"

    def put(self, a: np.ndarray):
        """A host array on this target's device, in its library."""
        if self.library == "numpy":
            return a
        import torch

        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def get(self, a) -> np.ndarray:
        """A result back on the host, as float64 for floats."""
        if self.library == "numpy":
            assert isinstance(a, np.ndarray), f"numpy in must give numpy out; got {type(a).__name__}"
            return a
        import torch

        assert isinstance(a, torch.Tensor), f"torch in must give torch out; got {type(a).__name__}"
        assert a.device.type == self.device.split(":")[0]
        if a.dtype == torch.bfloat16:
            return a.cpu().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return a.cpu().numpy()

    def stack(self, weights, dtype):
        return fm.ExpertStack.from_gptq(weights, backend=self.backend, device=self.device, dtype=dtype)


def _targets():
    targets = [Target("cpu", "cpu", "numpy", ["float32", "float16", "bfloat16"])]
    try:
        import torch  # noqa: F401

        targets.append(Target("cpu", "cpu", "torch", ["float32", "float16", "bfloat16"]))
    except ImportError:
        pass
    if any(b.name == "cuda" and b.available for b in fm.backends()):
        targets.append(Target("cuda", "cuda", "torch", ["float16", "bfloat16"]))
    return targets


TARGETS = _targets()


@pytest.fixture(params=TARGETS, ids=repr)
def target(request) -> Target:
    return request.param
