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
from ferrum_moe.testing import captured_graph

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


class L2Flush:
    """Evicts L2 before a timed replay by sweeping a 256 MiB buffer: "write"
    zeroes it, leaving L2 full of its dirty lines, whose write-back the next
    kernel's misses pay (as after a real layer's writes; the benchmarks' basis);
    "read" sums it, leaving L2 clean (as ncu's cache control does)."""

    MODES = ("write", "read")

    def __init__(self, mode: str = "write", device: str = "cuda"):
        if mode not in self.MODES:
            raise ValueError(f"L2 flush mode must be one of {self.MODES}; got {mode!r}")
        self.mode = mode
        self.buffer = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        self.sink = torch.empty((), dtype=torch.int64, device=device)

    def __call__(self) -> None:
        if self.mode == "write":
            self.buffer.zero_()
        else:
            torch.sum(self.buffer.view(torch.int64), dim=0, out=self.sink)


def time_graph(fn, flush: L2Flush, repeats: int, warmup: bool = True) -> float:
    """Median microseconds of one replay of fn(stream) captured in a graph, L2
    flushed before each replay."""
    g = captured_graph(fn, warmup)
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        flush()
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


def random_stacked(rng, e: int, k: int, n: int, bits: int = 4, act_order: bool = False) -> dict:
    """Stacked symmetric GPTQ arrays (INT4 or INT8) of random codes and scales
    (host numpy, the form fm.ExpertStack.from_gptq and, for INT4 without
    act-order, the peer take). act_order: each expert's rows fall in their
    groups in a random order (g_idx), as desc_act checkpoints store them."""
    per_word = 32 // bits
    qweight = np.frombuffer(bytearray(rng.bytes(e * (k // per_word) * n * 4)), np.int32).reshape(e, k // per_word, n)
    scales = (rng.random((e, k // GROUP, n), np.float32) * 0.02 + 0.005).astype(np.float16)
    if bits == 8:
        scales /= 16  # codes span 16x the range: the same magnitude of weights
    stacked = dict(qweight=qweight, scales=scales, bits=bits, group_size=GROUP)
    if act_order:
        stacked["g_idx"] = np.stack([rng.permutation(k) // GROUP for _ in range(e)]).astype(np.int32)
    return stacked


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
    g_idx = stacked.get("g_idx")
    out = torch.empty(e, n, kw * per_word, device="cuda", dtype=torch.bfloat16)
    shifts = torch.arange(0, 32, bits, device="cuda", dtype=torch.int32).view(1, per_word, 1)
    for i in range(e):  # one expert at a time: the int32 codes of all of them would not fit
        codes = ((q[i].cuda().unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(kw * per_word, n)
        row_scales = (s[i].cuda().to(torch.bfloat16).repeat_interleave(GROUP, dim=0) if g_idx is None
                      else s[i].cuda().to(torch.bfloat16)[torch.from_numpy(g_idx[i]).long().cuda()])
        w = (codes - (1 << (bits - 1))).to(torch.bfloat16) * row_scales
        out[i] = w.t()
    return out.transpose(1, 2)


_READ_KERNEL = r"""
// CTA (s, c) of a grid of nseg x per_seg reads part c of segment s (16-byte
// words; segments are seg_len words long, each at its own offset into base)
// with streaming loads, four in flight per thread; the XOR keeps them alive.
extern "C" __global__ void read_segments(const uint4* base, const long long* starts, long long seg_len,
                                         int per_seg, unsigned* sink) {
  const long long s = blockIdx.x / per_seg, c = blockIdx.x % per_seg;
  const long long begin = seg_len * c / per_seg, end = seg_len * (c + 1) / per_seg;
  const uint4* p = base + starts[s];
  unsigned acc = 0;
  long long i = begin + threadIdx.x;
  for (; i + 3 * blockDim.x < end; i += 4 * blockDim.x) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldcs(p + i + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < end; i += blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x % 1024] = acc;
}
"""


class ReadFloor:
    """The time to read a layer call's active expert weights with a plain
    streaming kernel (CuPy RawKernel, no dequant, no math): one launch over
    w13's active experts, one over w2's, dependent as the layer's two GEMMs
    are; timed like the layers (graph replay, L2 flushed), the best of a few
    grid sizes. The achievable floor at small M, where a launch's start and
    tail are a large share of the copy-rate floor (make(): None where CuPy is
    missing or cannot build the kernel)."""

    def __init__(self, num_experts: int, w13_bytes: int, w2_bytes: int):
        import cupy

        self.cupy = cupy
        self.kernel = cupy.RawKernel(_READ_KERNEL, "read_segments")
        self.words = [b // 16 for b in (w13_bytes, w2_bytes)]
        # One buffer per role, the experts back to back (their contents do not matter).
        self.buffers = [torch.empty(num_experts * w * 16, dtype=torch.uint8, device="cuda") for w in self.words]
        self.sink = torch.zeros(1024, dtype=torch.int32, device="cuda")
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count

    def us(self, ids: torch.Tensor, flush: L2Flush, repeats: int) -> float:
        active = torch.unique(ids).to(torch.int64)
        starts = [(active * w).contiguous() for w in self.words]
        best = float("inf")
        for ctas_per_sm in (2, 4, 8):
            per_seg = [max(1, -(-self.sms * ctas_per_sm // len(active))) for _ in self.words]

            def run(s, per_seg=per_seg):
                stream = self.cupy.cuda.ExternalStream(s.cuda_stream)
                for buf, st, w, ps in zip(self.buffers, starts, self.words, per_seg):
                    self.kernel((len(active) * ps,), (256,), (buf.data_ptr(), st.data_ptr(), self.cupy.int64(w),
                                                             self.cupy.int32(ps), self.sink.data_ptr()),
                                stream=stream)

            best = min(best, time_graph(run, flush, repeats))
        return best

    @staticmethod
    def make(num_experts: int, w13_bytes: int, w2_bytes: int):
        try:
            return ReadFloor(num_experts, w13_bytes, w2_bytes)
        except Exception as exc:  # no CuPy, or it cannot compile here: the column is left out
            print("read floor skipped:", type(exc).__name__, exc)
            return None


def routing(m: int, e: int, top_k: int):
    """The same random top-k routing in every run (seeded by M)."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    logits = torch.randn(m, e, device="cuda", generator=gen)
    tw, ids = torch.topk(torch.softmax(logits, -1), top_k)
    return tw.contiguous(), ids.int().contiguous()
