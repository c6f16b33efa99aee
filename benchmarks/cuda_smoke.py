"""Runs each CUDA kernel family once on small inputs (every format x dtype, routed,
batched, align, activation, sum), routed GEMMs with the gated output on the 128-row
tiles (--gated), dense Linears of long K (--linear), and one layer
called from four threads: the workload compute-sanitizer checks. --linear-only
--linear KxNxM runs one shape alone (a probe). --threads-only --threads 8 --calls 32
--copy-in-threads is the eight-thread CUDA test's workload (device.sh's hang
stage: it does not finish under racecheck, docs/reliability.md)."""

import argparse
import threading
import time

import numpy as np
import torch

import ferrum_moe as fm
from ferrum_moe.testing import random_codes_weight

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--threads", type=int, default=4, help="threads calling one layer")
parser.add_argument("--calls", type=int, default=8, help="layer calls, spread over the threads")
parser.add_argument("--threads-only", action="store_true", help="skip the kernel families")
parser.add_argument("--copy-in-threads", action="store_true",
                    help="each call copies its inputs from the host (as the eight-thread test does)")
parser.add_argument("--linear", default="4096x2048x256,1024x16896x256",
                    help="fp16 Linear calls, KxNxM[,...], into fp16 and into float32; the default: long K at "
                         "M = 256, 16 tiles of 128 x 256 (too few for the SMs) and 132 of them (the Hopper "
                         "128-row tiles, 16 K slices each)")
parser.add_argument("--linear-only", action="store_true", help="only the --linear calls (a sanitizer probe)")
parser.add_argument("--gated", default="128x4224x600x4,4096x1024x128x2",
                    help="routed GEMMs with the gated output (silu(gate) * up) at routing block 128, "
                         "KxHALFxMxE[,...]; the default: 33 tiles a row unshared, and 16 tiles that split K")
parser.add_argument("--gated-only", action="store_true", help="only the --gated calls (a sanitizer probe)")
args = parser.parse_args()
rng = np.random.default_rng(1)
began = time.monotonic()


def progress(what: str) -> None:  # under the sanitizers a stage can take minutes: say where it is
    print(f"cuda smoke {time.monotonic() - began:7.1f} s: {what}", flush=True)


for shape in args.gated.split(",") if args.gated and not (args.threads_only or args.linear_only) else ():
    k, half, m, e = (int(v) for v in shape.split("x"))
    progress(f"gated routed GEMM {k} x 2 * {half}, M = {m}, {e} experts")
    stack = fm.ExpertStack.from_gptq([random_codes_weight(rng, k, 2 * half) for _ in range(e)], device="cuda",
                                     dtype="float16")
    ids = torch.stack([torch.randperm(e, device="cuda")[:2] for _ in range(m)]).int()
    routing = fm.moe_align_block_size(ids, 128, e)
    stack.gemm_routed(torch.randn(m, k, device="cuda", dtype=torch.float16) / 8, routing, activation="silu")
    torch.cuda.synchronize()
if args.gated_only:
    print("cuda smoke: the gated calls ran")
    raise SystemExit(0)

for shape in args.linear.split(",") if args.linear and not args.threads_only else ():
    k, n, m = (int(v) for v in shape.split("x"))
    progress(f"Linear {k} x {n}, M = {m}")
    lin = fm.Linear.from_gptq(random_codes_weight(rng, k, n), device="cuda", dtype="float16")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16) / 8
    lin(x)
    lin(x, out=torch.empty(m, n, device="cuda"))  # float32 out: the staged float32 epilogue at M >= 128
    torch.cuda.synchronize()
if args.linear_only:
    print("cuda smoke: the Linear calls ran")
    raise SystemExit(0)

for dtype, tdtype in () if args.threads_only else (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
    for bits, group_size, sym, act_order in ((4, 128, True, False), (4, 32, False, True), (8, 64, False, False)):
        k, n, e = 256, 128, 4
        weights = []
        for _ in range(e):
            g_idx = (rng.permutation(k) * (k // group_size) // k).astype(np.int32) if act_order else None
            weights.append(fm.gptq.quantize(rng.standard_normal((k, n)), bits, group_size, sym, g_idx=g_idx,
                                            checkpoint_format="gptq_v2"))
        stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
        progress(f"{dtype} INT{bits} g{group_size}{' act-order' if act_order else ''}")
        x = torch.randn(170, k, device="cuda", dtype=tdtype)
        # 16-, 32-, 64- and (Hopper) 128-row tiles.
        stack.gemm_batched(x, [[0, 0, 0, 5], [3, 5, 5, 13]])
        stack.gemm_batched(x, [[2, 9, 0, 30]])
        stack.gemm_batched(x, [[3, 5, 5, 50]])
        stack.gemm_batched(x, [[1, 37, 0, 133]])
        for block_size in (16, 32, 64, 128):
            ids = torch.randint(0, e, (170, 2), device="cuda", dtype=torch.int32)
            routing = fm.moe_align_block_size(ids, block_size, e)
            stack.gemm_routed(x, routing, topk_weights=torch.rand(170, 2, device="cuda"))
    # Long K, few tokens: the stream-K launches of 32- and 64-row tiles and their reduction.
    lin = fm.Linear.from_gptq(fm.gptq.quantize(rng.standard_normal((4096, 256))), device="cuda", dtype=dtype)
    lin(torch.randn(24, 4096, device="cuda", dtype=tdtype))
    lin(torch.randn(40, 4096, device="cuda", dtype=tdtype))
    w13 = fm.ExpertStack.from_gptq([fm.gptq.quantize(rng.standard_normal((256, 256)))] * 4, device="cuda", dtype=dtype)
    w2 = fm.ExpertStack.from_gptq([fm.gptq.quantize(rng.standard_normal((128, 256)))] * 4, device="cuda", dtype=dtype)
    x = torch.randn(9, 256, device="cuda", dtype=tdtype)
    fm.fused_moe(x, w13, w2, torch.rand(9, 2, device="cuda"), torch.randint(0, 4, (9, 2), device="cuda"))
    # Long K, narrow N, one token: the stream-K launch and its cross-CTA reduction.
    lin = fm.Linear.from_gptq(fm.gptq.quantize(rng.standard_normal((4096, 256))), device="cuda", dtype=dtype)
    for _ in range(2):
        lin(torch.randn(1, 4096, device="cuda", dtype=tdtype))
torch.cuda.synchronize()
progress(f"one layer from {args.threads} threads, {args.calls} calls")
# One layer from several threads on one stream (the eight-thread CUDA test,
# smaller by default for the tools): every thread's results equal the serial calls'.
dtype = "float16"
w13 = fm.ExpertStack.from_gptq([fm.gptq.quantize(rng.standard_normal((256, 256)))] * 4, device="cuda", dtype=dtype)
w2 = fm.ExpertStack.from_gptq([fm.gptq.quantize(rng.standard_normal((128, 256)))] * 4, device="cuda", dtype=dtype)
layer = fm.MoE(w13, w2, top_k=2)
sizes = [int(m) for m in rng.integers(1, 24, args.calls)]
host_calls = [((rng.standard_normal((m, 256)) / 4).astype(np.float16), rng.random((m, 2)).astype(np.float32),
               rng.integers(0, 4, (m, 2)).astype(np.int32)) for m in sizes]


def call(j: int) -> torch.Tensor:
    x, tw, ids = (torch.from_numpy(a).cuda() for a in host_calls[j]) if args.copy_in_threads else device_calls[j]
    return layer(x, tw, ids).cpu()


device_calls = [] if args.copy_in_threads else [tuple(torch.from_numpy(a).cuda() for a in c) for c in host_calls]
serial = [call(j) for j in range(args.calls)]
threaded = [None] * args.calls
start = threading.Barrier(args.threads)


def work(first: int) -> None:
    start.wait()
    for j in range(first, args.calls, args.threads):
        threaded[j] = call(j)
        progress(f"thread {first}: call {j} done")


threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert all(torch.equal(a, b) for a, b in zip(threaded, serial)), "threaded layer calls differ from serial ones"
print("cuda smoke: every kernel family ran" if not args.threads_only else "cuda smoke: the threaded layer ran")
