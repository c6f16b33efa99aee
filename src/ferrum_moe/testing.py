"""Test helpers for ferrum-moe and for backend authors: float64 references,
random GPTQ weights, NaN-poisoned outputs, and `check_backend`, a conformance
run of the API against those references on any installed backend.

    from ferrum_moe.testing import check_backend
    report = check_backend("mybackend", device="cpu", dtype="float16")
    assert report.ok, report

From the command line (exit status 0 when nothing failed, 1 when a check
failed, 2 when the backend cannot be used)::

    python -m ferrum_moe.testing mybackend [--device cuda] [--dtype float16|bfloat16|float32|all]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import ml_dtypes
import numpy as np

import ferrum_moe as fm

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Relative error bounds against float64: float32 accumulates exactly enough to
# land far below 1e-5; a 16-bit output rounds each element by 2^-11 (float16) or
# 2^-8 (bfloat16), plus the rounding of intermediates in a whole layer.
REL_TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}


def random_weight(rng, k, n, *, bits=4, group_size=128, sym=True, act_order=False, dtype="float16",
                  checkpoint_format="gptq") -> fm.GPTQWeight:
    """A GPTQ matrix quantized from random floats; scales stored in ``dtype`` so
    dequantize() is exactly what a kernel computing in that dtype sees."""
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    g_idx = _act_order_g_idx(rng, k, fm.gptq.num_groups(k, group_size)) if act_order else None
    return fm.gptq.quantize(w, bits, group_size, sym, g_idx=g_idx, checkpoint_format=checkpoint_format,
                            scale_dtype=NUMPY_DTYPES[dtype])


def random_codes_weight(rng, k, n, *, group_size=128, scale_dtype=np.float16, bits=4, sym=True,
                        act_order=False) -> fm.GPTQWeight:
    """A GPTQ matrix (INT4 or INT8) of uniformly random codes and scales (and
    zero points where asymmetric; act-order's shuffled group of each row), as
    a checkpoint holds them: fast to make at model size (no float weights)."""
    per_word = 32 // bits
    groups = fm.gptq.num_groups(k, group_size)
    qweight = rng.integers(-(2**31), 2**31, (-(-k // per_word), n), dtype=np.int64).astype(np.int32)
    scales = (rng.random((groups, n)) * 0.02 + 0.005).astype(scale_dtype)
    # GPTQ v1 stores zero - 1: stored codes up to 2^bits - 2 (all ones would be a zero of 2^bits).
    qzeros = None if sym else fm.gptq.pack(rng.integers(0, 2**bits - 1, (groups, n)), bits, axis=1)
    g_idx = _act_order_g_idx(rng, k, groups) if act_order else None
    return fm.GPTQWeight(qweight, scales, qzeros, g_idx, bits=bits, group_size=group_size, sym=sym, k=k)


def _act_order_g_idx(rng, k: int, groups: int) -> np.ndarray:
    """Act-order's g_idx: every group, its rows shuffled over K."""
    return (rng.permutation(k) * groups // k).astype(np.int32)


def random_routing(rng, tokens: int, experts: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(topk_weights float32, topk_ids int32), [tokens, top_k]: each token's
    top_k distinct experts of random logits, weighted by their softmax."""
    logits = rng.standard_normal((tokens, experts))
    ids = np.argsort(-logits, axis=1)[:, :top_k].astype(np.int32)
    chosen = np.exp(np.take_along_axis(logits, ids, axis=1))
    return (chosen / chosen.sum(axis=1, keepdims=True)).astype(np.float32), ids


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


def silu_product(y) -> np.ndarray:
    """silu(gate) * up in float64 for y = [gate | up] along its last axis."""
    y = as64(y)
    half = y.shape[-1] // 2
    return y[..., :half] / (1 + np.exp(-y[..., :half])) * y[..., half:]


def reference_moe(x, w13, w2, topk_weights, topk_ids, *, expert_map=None, num_experts=None,
                  on_input=False) -> np.ndarray:
    """float64 MoE layer on dequantized weights, a plain loop over (token, k)."""
    x = as64(x)
    topk_ids, topk_weights = np.asarray(topk_ids), np.asarray(topk_weights, np.float64)
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
            y = silu_product(h) @ dense[e][1]
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




@dataclasses.dataclass
class Report:
    """What check_backend found: one line per check, "ok", "unsupported: ..." or
    "FAILED: ..."."""

    backend: str
    results: dict[str, str]

    @property
    def ok(self) -> bool:
        return not any(r.startswith("FAILED") for r in self.results.values())

    def __str__(self) -> str:
        lines = [f"conformance of backend '{self.backend}':"]
        lines += [f"  {name:<38} {result}" for name, result in self.results.items()]
        return "\n".join(lines)


def steps_alone(fn):
    """fn() with FERRUM_MOE_LAYER_CALL=0 (for the whole process while it runs):
    the layer's separate steps even where the backend takes the one call (a
    graph captured in it keeps them). For conformance runs and benchmarks."""
    before = os.environ.get("FERRUM_MOE_LAYER_CALL")
    os.environ["FERRUM_MOE_LAYER_CALL"] = "0"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["FERRUM_MOE_LAYER_CALL"]
        else:
            os.environ["FERRUM_MOE_LAYER_CALL"] = before


def check_backend(backend: str, *, device: str = "cpu", dtype: str = "float16", put=None, get=None,
                  seed: int = 0) -> Report:
    """Runs the API on `backend` against float64 references: gemm_batched over
    several formats, expert views with bias, align, gemm_routed and a whole
    fused_moe layer (also of one token and with pair routing named: ABI 1.2,
    and the whole layer in one call where the plugin offers it, ABI 1.4, and
    one token's steps without it),
    gemm_routed's gated output (ABI 1.3); then what a backend must guard: zero-token inputs,
    zero-filled new results (FM_ALLOC_ZEROED) and routing with out-of-range
    entries. Operations the backend refuses with NotImplementedError are
    reported as unsupported, not failed. `put`/`get` move host numpy arrays to
    and from the device (default: numpy, for host backends)."""
    put = put or (lambda a: a)
    get = get or (lambda a: np.asarray(a))
    rng = np.random.default_rng(seed)
    tol = REL_TOL[dtype]
    results: dict[str, str] = {}

    def run(name, check):
        try:
            err = check()
            results[name] = "ok" if err is None or err < tol else f"FAILED: relative error {err:.2e} > {tol:.0e}"
        except NotImplementedError as e:
            results[name] = f"unsupported: {e}"
        except Exception as e:  # a conformance run reports, it does not stop
            results[name] = f"FAILED: {type(e).__name__}: {e}"

    def stack(weights):
        return fm.ExpertStack.from_gptq(weights, backend=backend, device=device, dtype=dtype)

    for bits, group_size, sym, act_order in ((4, 128, True, False), (4, 32, False, True), (8, 64, False, False)):
        def batched(bits=bits, group_size=group_size, sym=sym, act_order=act_order):
            weights = [random_weight(rng, 200, 48, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                                     dtype=dtype) for _ in range(3)]
            x = random_activations(rng, (7, 200), dtype)
            out = put(poisoned((7, 48), dtype))
            stack(weights).gemm_batched(put(x), [[2, 0, 0, 3], [0, 3, 3, 4]], out=out)
            ref = np.concatenate([as64(x[:3]) @ weights[2].dequantize(np.float64),
                                  as64(x[3:]) @ weights[0].dequantize(np.float64)])
            return rel_error(get(out), ref)

        run(f"gemm_batched int{bits} g{group_size}{' asym' if not sym else ''}{' act-order' if act_order else ''}",
            batched)

    def views():
        weights = [random_weight(rng, 128, 64, group_size=64, dtype=dtype) for _ in range(2)]
        s = stack(weights)
        x = random_activations(rng, (3, 128), dtype)
        bias = random_activations(rng, (s.column_alignment * 2 if s.column_alignment < 32 else 32,), dtype)
        n = bias.shape[0]
        lin = s.expert_linear(64, n, bias=put(bias))
        return rel_error(get(lin(put(x))), as64(x) @ weights[1].dequantize(np.float64)[:, :n] + as64(bias))

    run("expert_linear with bias", views)

    def align():
        ids = rng.integers(-1, 9, (37, 2))
        r = fm.moe_align_block_size(put(ids.astype(np.int32)), 16, 8, backend=backend)
        sorted_ids, expert_ids, total = reference_align(ids, 16, 8)
        got = int(get(r.num_tokens_post_padded)[0])
        same = (got == total and get(r.sorted_token_ids)[:total].tolist() == sorted_ids
                and get(r.expert_ids)[:total // 16].tolist() == expert_ids)
        return None if same else float("inf")

    run("moe_align_block_size", align)

    def layer(m, block_size=None):
        # (A gate half of 128 columns: the shape a fused layer call, ABI 1.4, is likeliest to take.)
        e, hidden, inter = 8, 128, 128
        w13 = [random_weight(rng, hidden, 2 * inter, group_size=64, dtype=dtype) for _ in range(e)]
        w2 = [random_weight(rng, inter, hidden, group_size=64, dtype=dtype) for _ in range(e)]
        x = random_activations(rng, (m, hidden), dtype)
        ids = np.stack([rng.permutation(e)[:2] for _ in range(m)]).astype(np.int32)
        tw = rng.random((m, 2)).astype(np.float32)
        y = fm.fused_moe(put(x), stack(w13), stack(w2), put(tw), put(ids), block_size=block_size)
        return rel_error(get(y), reference_moe(x, w13, w2, tw, ids))

    def gated():
        e, k, half = 4, 128, 128
        weights = [random_weight(rng, k, 2 * half, group_size=64, dtype=dtype) for _ in range(e)]
        x = random_activations(rng, (9, k), dtype)
        ids = np.stack([rng.permutation(e)[:2] for _ in range(9)]).astype(np.int32)
        tw = rng.random((9, 2)).astype(np.float32)  # applied to y before the activation
        routing = fm.moe_align_block_size(put(ids), 16, e, backend=backend)
        y = as64(get(stack(weights).gemm_routed(put(x), routing, topk_weights=put(tw), activation="silu")))
        full = np.stack([as64(x[p // 2]) @ weights[ids.flat[p]].dequantize(np.float64) * float(tw.flat[p])
                         for p in range(18)])
        return rel_error(y, silu_product(full))

    # The gated epilogue where the plugin has ABI 1.3, else the host's activation.
    run("gemm_routed, silu(gate) * up", gated)
    run("fused_moe", lambda: layer(9))
    # One token: gemm_routed's pair routing where the plugin has ABI 1.2, the whole layer in one
    # call where it offers one (ABI 1.4); then pair routing named at three tokens.
    run("fused_moe, one token", lambda: layer(1))
    run("fused_moe, pair routing at 3 tokens", lambda: layer(3, block_size=0))
    # The same without the one call: the steps a 1.4 plugin still runs where it declines.
    run("fused_moe, one token, the steps", lambda: steps_alone(lambda: layer(1)))

    def zero_tokens():
        weights = [random_weight(rng, 64, 32, group_size=32, dtype=dtype) for _ in range(2)]
        y = get(stack(weights).gemm_batched(put(random_activations(rng, (0, 64), dtype)), [[1, 0, 0, 0]]))
        return None if y.shape == (0, 32) else float("inf")

    run("zero-token gemm_batched", zero_tokens)

    def zero_filled():
        weights = [random_weight(rng, 64, 32, group_size=32, dtype=dtype) for _ in range(2)]
        x = random_activations(rng, (2, 64), dtype)
        y = as64(get(stack(weights).gemm_batched(put(x), [[1, 0, 3, 2]])))
        if y.shape != (5, 32) or np.any(y[:3] != 0):
            return float("inf")
        return rel_error(y[3:], as64(x) @ weights[1].dequantize(np.float64))

    run("new results zero-filled", zero_filled)

    def corrupt_routing():
        weights = [random_weight(rng, 64, 32, group_size=32, dtype=dtype) for _ in range(2)]
        x = random_activations(rng, (3, 64), dtype)
        # Block 0 -> expert 0 (ids 0, 1); 1 -> expert 7 (no such expert); 2 -> -3; 3 -> expert 1
        # (ids 4, 5); ids 99999 and -5 are out of range; the count runs past the buffer.
        routing = fm.Routing(put(np.array([0, 1, 99999, -5, 2, 3, 4, 5], np.int32)),
                             put(np.array([0, 7, -3, 1], np.int32)), put(np.array([1 << 30], np.int32)),
                             block_size=2, top_k=2, num_tokens=3)
        out = put(poisoned((6, 32), dtype))
        stack(weights).gemm_routed(put(x), routing, out=out)
        got = as64(get(out))
        if (~np.isnan(got).all(axis=1)).tolist() != [True, True, False, False, True, True]:
            return float("inf")
        ref = np.stack([as64(x[p // 2]) @ weights[0 if p < 2 else 1].dequantize(np.float64) for p in (0, 1, 4, 5)])
        return rel_error(got[[0, 1, 4, 5]], ref)

    run("routing with out-of-range entries", corrupt_routing)
    return Report(backend, results)


def captured_graph(call, warm: bool = True):
    """call(stream) captured in a torch CUDA graph on a new side stream (run once
    there first where `warm`, so the capture allocates nothing); replay it with
    .replay(). For the CUDA tests and benchmarks."""
    import torch

    stream = torch.cuda.Stream()
    if warm:
        with torch.cuda.stream(stream):
            call(stream)
        stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        call(stream)
    return graph


def _device_transfers(device: str):
    """put/get for check_backend: numpy as it is on the host, PyTorch for devices."""
    if device == "cpu":
        return None, None
    import torch

    def put(a):
        if a.dtype == NUMPY_DTYPES["bfloat16"]:
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(device)
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    def get(t):
        t = t.cpu()
        return t.view(torch.uint16).numpy().view(NUMPY_DTYPES["bfloat16"]) if t.dtype == torch.bfloat16 else t.numpy()

    return put, get


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ferrum_moe.testing",
                                     description="Runs the conformance checks on an installed backend.")
    parser.add_argument("backend", help="the backend's entry-point name, e.g. cpu")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (devices other than cpu use PyTorch)")
    parser.add_argument("--dtype", default="float16", choices=sorted(NUMPY_DTYPES) + ["all"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        fm.get_backend(args.backend)
    except fm.BackendUnavailableError as e:
        print(e, file=sys.stderr)
        return 2
    put, get = _device_transfers(args.device)
    failed = False
    for dtype in sorted(NUMPY_DTYPES) if args.dtype == "all" else [args.dtype]:
        report = check_backend(args.backend, device=args.device, dtype=dtype, put=put, get=get, seed=args.seed)
        print(f"{dtype}: {report}")
        failed = failed or not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
