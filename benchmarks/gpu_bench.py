"""What the GPU benchmarks share: the timing harness (CUDA-graph replay, L2
flushed before each, median), the physical limits measured in the same run,
random GPTQ weights as a checkpoint holds them, and the vLLM Marlin MoE peer
(../shared/peers copied to .peers, see its README)."""

from __future__ import annotations

import pathlib
import statistics
import sys

import numpy as np
import torch

import ferrum_moe as fm

MODELS = {  # experts, top_k, hidden, intermediate
    "mixtral": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "deepseek-v3": (256, 8, 7168, 2048),
}
GROUP = 128
# Bytes per INT4 weight with its share of the fp16 group scale.
def bytes_per_weight(bits: int = 4) -> float:
    """A weight's code and its share of its group's fp16 scale."""
    return bits / 8 + 2 / GROUP


BYTES_PER_WEIGHT = bytes_per_weight(4)


def layer_shape(spec: str) -> tuple[int, int, int, int]:
    """(experts, top_k, hidden, intermediate) of a MODELS name, or of
    'name:E:top_k:hidden:inter' for any other layer."""
    if spec in MODELS:
        return MODELS[spec]
    parts = spec.split(":")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise SystemExit(f"model {spec!r}: one of {', '.join(MODELS)}, or name:E:top_k:hidden:inter")
    return tuple(int(p) for p in parts[1:])


def peer_module():
    """vllm_marlin_moe from .peers beside the checkout, or (None, why not)."""
    peers = pathlib.Path(__file__).resolve().parents[1] / ".peers"
    if not (peers / "vllm_marlin_moe.py").exists():
        return None, f"{peers} is missing (copy ../shared/peers there)"
    sys.path.insert(0, str(peers))
    import vllm_marlin_moe as vmm

    ok, why = vmm.available()
    return (vmm, why) if ok else (None, why)


def time_graph(fn, flush: torch.Tensor, repeats: int, warmup: bool = True) -> float:
    """Median microseconds of one replay of fn(stream) captured in a graph, L2
    flushed before each replay."""
    s = torch.cuda.Stream()
    if warmup:
        with torch.cuda.stream(s):
            fn(s)
        s.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn(s)
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        flush.zero_()
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + write counted."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) * 1e-3)


def tensor_core_rate(dtype=torch.float16) -> float:
    """FLOP/s of a cuBLAS 8192^3 matmul."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) * 1e-3)


def random_stacked(rng, e: int, k: int, n: int, bits: int = 4) -> dict:
    """Stacked symmetric GPTQ arrays (INT4 or INT8) of random codes and scales
    (host numpy, the form fm.ExpertStack.from_gptq and, for INT4, the peer take)."""
    per_word = 32 // bits
    qweight = np.frombuffer(bytearray(rng.bytes(e * (k // per_word) * n * 4)), np.int32).reshape(e, k // per_word, n)
    scales = (rng.random((e, k // GROUP, n), np.float32) * 0.02 + 0.005).astype(np.float16)
    if bits == 8:
        scales /= 16  # codes span 16x the range: the same magnitude of weights
    return dict(qweight=qweight, scales=scales, bits=bits, group_size=GROUP)


def ferrum_stack(stacked: dict, dtype: str) -> fm.ExpertStack:
    return fm.ExpertStack.from_gptq(stacked, device="cuda", dtype=dtype)


def dequantized_bf16(stacked: dict) -> torch.Tensor:
    """[E, K, N] bf16 on the GPU, stored N-major ([E, N, K] transposed, as
    torch's grouped GEMM wants its right operand): the dense bar's weights."""
    q = torch.from_numpy(stacked["qweight"])
    s = torch.from_numpy(stacked["scales"])
    bits = stacked["bits"]
    per_word = 32 // bits
    e, kw, n = q.shape
    out = torch.empty(e, n, kw * per_word, device="cuda", dtype=torch.bfloat16)
    shifts = torch.arange(0, 32, bits, device="cuda", dtype=torch.int32).view(1, per_word, 1)
    for i in range(e):  # one expert at a time: the int32 codes of all of them would not fit
        codes = ((q[i].cuda().unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(kw * per_word, n)
        w = (codes - (1 << (bits - 1))).to(torch.bfloat16) * s[i].cuda().to(torch.bfloat16).repeat_interleave(GROUP, dim=0)
        out[i] = w.t()
    return out.transpose(1, 2)


def routing(m: int, e: int, top_k: int):
    """The same random top-k routing in every run (seeded by M)."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    logits = torch.randn(m, e, device="cuda", generator=gen)
    tw, ids = torch.topk(torch.softmax(logits, -1), top_k)
    return tw.contiguous(), ids.int().contiguous()
