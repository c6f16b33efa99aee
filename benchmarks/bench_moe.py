"""Whole-MoE-layer benchmark on a GPU, side by side in one process: ferrum-moe,
vLLM's Marlin MoE (the peer, align included as vLLM runs it), and dense bf16
torch._grouped_mm on the dequantized weights (the prefill bar), against the
memory and tensor-core floors measured in the same run.

Timing: CUDA-graph replay, L2 flushed before each (--flush: by a memset, the
basis of docs/benchmarks.md, or by a read), median of --repeats; the same
weights and the same seeded routing for every library. Prints a table and
writes JSON (--json).

    python benchmarks/bench_moe.py [--models mixtral,...,name:E:top_k:hidden:inter] [--tokens 1,16,...]
        [--dtypes float16,bfloat16] [--grouped-from 256] [--block-sizes 16,32,64,128] [--bits 4|8] [--act-order]
        [--flush write|read] [--json out.json]

The read floor (up to --read-floor-to tokens, CuPy): a plain streaming kernel
reading the call's active experts' bytes, w13's then w2's, timed the same way:
what two dependent launches over those bytes cost before any dequant or math.

--block-sizes also times ferrum-moe with each of those routing block sizes (the
block size picks the CUDA tile height; 0 is pair routing, no align): the measurements behind
routing.default_block_size's rule and the block tables
(benchmarks/write_block_table.py, src/ferrum_moe/block_tables.py).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from gpu_bench import (GROUP, MODELS, L2Flush, ReadFloor, bytes_per_weight, copy_bandwidth, dequantized_bf16,
                       ferrum_stack, layer_shape, peer_module, random_stacked, routing, tensor_core_rate, time_graph)

import ferrum_moe as fm
from ferrum_moe.testing import steps_alone

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def grouped_layer(w13: torch.Tensor, w2: torch.Tensor, top_k: int):
    """The dense bar: sort pairs by expert, two torch._grouped_mm in bf16,
    activation, weighted top-k sum; graph-capturable (no host reads)."""
    e, inter = w13.shape[0], w2.shape[1]

    def run(x, tw, ids, out):
        flat = ids.flatten().long()
        order = torch.argsort(flat)
        counts = torch.zeros(e, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        a = x[order // top_k]
        h = torch._grouped_mm(a, w13, offs=offs)
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = torch._grouped_mm(act, w2, offs=offs)
        pairs = torch.empty_like(y)
        pairs[order] = y * tw.flatten()[order, None].to(y.dtype)
        out.copy_(pairs.view(-1, top_k, y.shape[1]).float().sum(1))

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,256,1024,4096")
    parser.add_argument("--big-tokens", default="16384", help="extra token counts for Mixtral and DeepSeek-V3 ('none': no more)")
    parser.add_argument("--dtypes", default="float16")
    parser.add_argument("--grouped-from", type=int, default=256, help="time the bf16 grouped GEMM from this M up")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--block-sizes", default="", help="also time ferrum-moe at these routing block sizes")
    parser.add_argument("--steps-too", action="store_true",
                        help="also time ferrum-moe (and block 0 where --block-sizes has it) with FERRUM_MOE_LAYER_CALL=0: "
                             "the separate steps where the backend takes a pair-routed layer in one call (plugin ABI 1.4)")
    parser.add_argument("--read-floor-to", type=int, default=64,
                        help="time reading the active experts' bytes with a plain kernel up to this M (0: never)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4,
                        help="the experts' code width (the peer runs INT4 only: skipped at 8)")
    parser.add_argument("--act-order", action="store_true",
                        help="act-order weights (g_idx: rows out of group order; the peer, whose wrapper takes "
                             "no g_idx, is skipped)")
    parser.add_argument("--flush", choices=L2Flush.MODES, default="write",
                        help="how L2 is evicted before each replay: write (a memset: L2 left dirty, the basis of "
                             "docs/benchmarks.md) or read (a sum: L2 left clean)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bw, rate = copy_bandwidth(), tensor_core_rate()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bw / 1e12:.2f} TB/s, fp16 matmul {rate / 1e12:.0f} TFLOP/s; INT{args.bits} experts, "
          f"group {GROUP}{', act-order' if args.act_order else ''}; L2 flushed by a {args.flush}")
    if args.act_order:
        vmm, why = None, "its wrapper loads no g_idx"
    elif args.bits != 4:
        vmm, why = None, "it runs INT4 weights only"
    else:
        vmm, why = peer_module()
    if vmm is None:
        print("vLLM Marlin MoE peer skipped:", why)
    flush = L2Flush(args.flush)
    rows = []
    for model in args.models.split(","):
        e, top_k, hidden, inter = layer_shape(model)
        w13 = random_stacked(rng, e, hidden, 2 * inter, args.bits, args.act_order)
        w2 = random_stacked(rng, e, inter, hidden, args.bits, args.act_order)
        expert_bytes = 3 * hidden * inter * bytes_per_weight(args.bits)
        tokens = [int(t) for t in args.tokens.split(",")]
        if model in ("mixtral", "deepseek-v3") and args.big_tokens != "none":
            tokens += [int(t) for t in args.big_tokens.split(",")]
        read_floor, read_us = None, {}
        if any(m <= args.read_floor_to for m in tokens):
            read_floor = ReadFloor.make(e, int(2 * hidden * inter * bytes_per_weight(args.bits)),
                                        int(hidden * inter * bytes_per_weight(args.bits)))
        grouped = None
        if any(m >= args.grouped_from for m in tokens):
            grouped = grouped_layer(dequantized_bf16(w13), dequantized_bf16(w2), top_k)
        for dtype in args.dtypes.split(","):
            tdtype = TORCH_DTYPES[dtype]
            layer = fm.MoE(ferrum_stack(w13, dtype), ferrum_stack(w2, dtype), top_k=top_k)
            by_block = {int(b): fm.MoE(layer.w13, layer.w2, top_k=top_k, block_size=int(b))
                        for b in args.block_sizes.split(",") if b}
            peer = None
            if vmm is not None:
                peer = vmm.VllmMarlinMoE(w13["qweight"], w13["scales"], w2["qweight"], w2["scales"],
                                         group_size=GROUP, dtype=tdtype)
            for m in tokens:
                tw, ids = routing(m, e, top_k)
                x = torch.randn(m, hidden, device="cuda", dtype=tdtype) * 0.5
                out = torch.empty(m, hidden, device="cuda", dtype=tdtype)
                ours = time_graph(lambda s: layer(x, tw, ids, out=out, stream=s), flush, args.repeats)
                row = dict(model=model.split(":")[0], experts=e, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype,
                           bits=args.bits, group_size=GROUP, m=m, ferrum_us=ours, device=device)
                if args.act_order:
                    row["act_order"] = True
                if by_block:
                    row["ferrum_us_by_block_size"] = {
                        b: time_graph(lambda s, lb=lb: lb(x, tw, ids, out=out, stream=s), flush, args.repeats)
                        for b, lb in by_block.items()}
                if args.steps_too:
                    # (The variable only changes pair-routed calls: block 0, and the layer's own choice
                    # where that is block 0.)
                    row["ferrum_steps_us"] = steps_alone(
                        lambda: time_graph(lambda s: layer(x, tw, ids, out=out, stream=s), flush, args.repeats))
                    row["ferrum_steps_us_by_block_size"] = {
                        b: steps_alone(lambda lb=lb: time_graph(lambda s: lb(x, tw, ids, out=out, stream=s), flush,
                                                                args.repeats))
                        for b, lb in by_block.items() if b == 0}
                if peer is not None:
                    peer.prepare(x, tw, ids)
                    row["vllm_us"] = time_graph(lambda s: peer(stream=s), flush, args.repeats)
                    err = (peer.output.float() - out.float()).norm() / peer.output.float().norm()
                    row["vs_vllm_rel_diff"] = float(err)
                # bf16 whatever the layer's dtype: timed once per token count.
                if grouped is not None and m >= args.grouped_from and dtype == args.dtypes.split(",")[0]:
                    xb, outb = x.to(torch.bfloat16), torch.empty(m, hidden, device="cuda", dtype=torch.float32)
                    try:
                        row["grouped_bf16_us"] = time_graph(lambda s: grouped(xb, tw, ids, outb), flush, args.repeats)
                    except RuntimeError as exc:  # a torch without _grouped_mm for this GPU
                        print("grouped GEMM skipped:", str(exc).splitlines()[0])
                        grouped = None
                active = len(torch.unique(ids))
                row["memory_floor_us"] = active * expert_bytes / bw * 1e6
                if read_floor is not None and m <= args.read_floor_to:
                    try:
                        if m not in read_us:  # the same bytes for every dtype: timed once per token count
                            read_us[m] = read_floor.us(ids, flush, args.repeats)
                        row["read_floor_us"] = read_us[m]
                    except Exception as exc:  # an auxiliary column: never the benchmark's end
                        print("read floor skipped:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                        read_floor = None
                row["compute_floor_us"] = 2 * m * top_k * 3 * hidden * inter / rate * 1e6
                rows.append(row)
                print(f"{model:<17} {dtype:<8} M={m:<6} ferrum {ours:9.1f} us  vLLM {row.get('vllm_us', float('nan')):9.1f}"
                      f"  grouped {row.get('grouped_bf16_us', float('nan')):9.1f}  floors {row['memory_floor_us']:7.1f}"
                      f" / {row['compute_floor_us']:8.1f}  read {row.get('read_floor_us', float('nan')):7.1f}", flush=True)
                if by_block:
                    print("    by block size: " + ", ".join(f"{b}: {t:.1f}" for b, t in row["ferrum_us_by_block_size"].items()))
                if args.steps_too:
                    print(f"    steps (FERRUM_MOE_LAYER_CALL=0): {row['ferrum_steps_us']:.1f}" +
                          "".join(f", block {b}: {t:.1f}" for b, t in row["ferrum_steps_us_by_block_size"].items()))
            del layer, peer, by_block
            torch.cuda.empty_cache()
        del read_floor
    print()
    print("| layer | dtype | M | memory floor us | read floor us | compute floor us | vLLM Marlin MoE us "
          "| torch bf16 grouped us | ferrum-moe us | ferrum / vLLM | floor / ferrum |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        floor = max(r["memory_floor_us"], r["compute_floor_us"])
        v, g = r.get("vllm_us"), r.get("grouped_bf16_us")
        ratio = r["ferrum_us"] / v if v else None
        rf = r.get("read_floor_us")
        print(f"| {r['model']} | {r['dtype']} | {r['m']} | {r['memory_floor_us']:.1f} | "
              f"{f'{rf:.1f}' if rf else '-'} | {r['compute_floor_us']:.1f} | "
              f"{f'{v:.1f}' if v else '-'} | {f'{g:.1f}' if g else '-'} | {r['ferrum_us']:.1f} | "
              f"{f'{ratio:.2f}' if v else '-'} | "
              f"{floor / r['ferrum_us']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bytes_per_s=bw, tensor_core_flops=rate, l2_flush=args.flush,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
