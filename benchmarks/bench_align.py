"""moe_align_block_size alone: ferrum-moe's against vLLM's (the peer's own
kernel, ../shared/peers), same routing, same block size (vLLM's rule for the
layer at that M), CUDA-graph replay, median of 30; both write into buffers
allocated beforehand (ours: a layer's workspace, as fm.MoE runs it). Issue 10
asks for M = 16384 x top-8 in a few tens of microseconds.

    python benchmarks/bench_align.py [--tokens 1,64,1024,4096,16384] [--json out.json]
"""

import argparse
import json

import torch

from ferrum_moe.arrays import import_array, stream_handle
from ferrum_moe.discovery import resolve
from ferrum_moe.moe import _Workspace
from ferrum_moe.routing import _align, default_block_size

from gpu_bench import MODELS, L2Flush, peer_module, routing, time_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="1,64,1024,4096,16384")
    parser.add_argument("--json")
    args = parser.parse_args()
    vmm, why = peer_module()
    if vmm is None:
        print("vLLM's align skipped:", why)
    flush = L2Flush()
    core = resolve("auto", (2, torch.cuda.current_device()))  # kDLCUDA
    ops = vmm._load() if vmm is not None else None
    rows = []
    print("| experts, top-k | M | block | ferrum-moe us | vLLM us | ferrum / vLLM |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for e, top_k in sorted({(e, k) for e, k, _, _ in MODELS.values()}):
        for m in (int(t) for t in args.tokens.split(",")):
            _, ids = routing(m, e, top_k)
            block = vmm.vllm_block_size_m(m, top_k, e) if vmm is not None else default_block_size(m * top_k, e)
            ws = _Workspace()
            ids_t = import_array(ids, "topk_ids", stream_handle(torch.cuda.current_stream()))
            ours = time_graph(lambda s: _align(core, ids_t, block, e, None, stream_handle(s), ws), flush, 30)
            theirs = float("nan")
            if vmm is not None:
                padded, blocks = vmm.vllm_align_sizes(ids.numel(), e, block)
                out = [torch.empty(n, dtype=torch.int32, device="cuda") for n in (padded, blocks, 1)]

                def vllm_align(s):
                    with torch.cuda.stream(s):
                        ops.moe_align_block_size(ids, e, block, *out, None)

                theirs = time_graph(vllm_align, flush, 30)
            rows.append(dict(experts=e, top_k=top_k, m=m, block_size=block, ferrum_us=ours, vllm_us=theirs))
            print(f"| {e}, {top_k} | {m} | {block} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
