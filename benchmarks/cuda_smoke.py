"""Runs each CUDA kernel family once on small inputs (every format x dtype, routed,
batched, align, activation, sum), and one layer called from four threads: the
workload compute-sanitizer checks."""

import threading
import time

import numpy as np
import torch

import ferrum_moe as fm

rng = np.random.default_rng(1)
began = time.monotonic()


def progress(what: str) -> None:  # under the sanitizers a stage can take minutes: say where it is
    print(f"cuda smoke {time.monotonic() - began:7.1f} s: {what}", flush=True)


for dtype, tdtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
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
progress("one layer from four threads")
# One layer from four threads on one stream (the eight-thread CUDA test, small
# enough for the tools): every thread's results equal the serial calls'.
layer = fm.MoE(w13, w2, top_k=2)
calls = [(torch.randn(m, 256, device="cuda", dtype=tdtype), torch.rand(m, 2, device="cuda"),
          torch.randint(0, 4, (m, 2), device="cuda", dtype=torch.int32)) for m in (1, 5, 9, 17, 3, 12, 7, 2)]
serial = [layer(*call).cpu() for call in calls]
threaded = [None] * len(calls)
start = threading.Barrier(4)


def work(first: int) -> None:
    start.wait()
    for j in range(first, len(calls), 4):
        threaded[j] = layer(*calls[j]).cpu()


threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert all(torch.equal(a, b) for a, b in zip(threaded, serial)), "threaded layer calls differ from serial ones"
print("cuda smoke: every kernel family ran")
