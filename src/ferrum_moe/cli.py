"""The ferrum-moe command: `info` (version, build, backends, devices), `demo`
(a whole MoE layer on random GPTQ INT4 weights, checked against float64),
`inspect` and `run` (a published checkpoint), and `tune` (the routing block
sizes of a layer shape, measured here and kept for later calls)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ferrum_moe.tuning import DEFAULT_BLOCKS, DEFAULT_TOKENS

SHAPES = {  # (num_experts, top_k, hidden, intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral": (8, 2, 4096, 14336),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
}


def _info(args) -> int:
    import ferrum_moe as fm

    build = fm._core.build_info()
    print(f"ferrum-moe {fm.__version__}")
    print(f"  core: {build['compiler']}, plugin ABI {build['abi']}, DLPack {build['dlpack']}")
    print(f"  headers: {fm.get_include()}")
    print(f"  cmake:   {fm.get_cmake_dir()}")
    print("backends:")
    for b in fm.backends():
        if b.available:
            print(f"  {b.name:<8} available    {b.version:<10} devices: {', '.join(b.device_types)} x{b.device_count}"
                  f"  ({b.description})")
        else:
            print(f"  {b.name:<8} unavailable  {b.version:<10} {b.error}")
    return 0


def _progress(iterable, desc: str, total: int | None = None):
    """A progress bar on stderr for the demo's slower steps (tqdm)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="expert", leave=False, mininterval=0.5)


def _random_weights(rng, e, k, n, group_size, desc):
    """Random INT4 codes and scales, as a checkpoint holds them: no float
    weights to quantize, so a model-sized layer is ready in a second or two."""
    from ferrum_moe.testing import random_codes_weight

    return [random_codes_weight(rng, k, n, group_size=group_size) for _ in _progress(range(e), desc)]


def _reference(x, w13, w2, topk_weights, topk_ids) -> np.ndarray:
    """float64 MoE on dequantized weights, one active expert at a time."""
    x = x.astype(np.float64)
    out = np.zeros((x.shape[0], w2[0].n))
    inter = w2[0].k
    active = np.unique(topk_ids)
    for e in _progress(active, "float64 reference", total=len(active)):
        tokens, slots = np.nonzero(topk_ids == e)
        h = x[tokens] @ w13[e].dequantize(np.float64)
        gate, up = h[:, :inter], h[:, inter:]
        act = gate / (1.0 + np.exp(-gate)) * up
        out[tokens] += topk_weights[tokens, slots, None] * (act @ w2[e].dequantize(np.float64))
    return out


def _demo(args) -> int:
    import ml_dtypes

    import ferrum_moe as fm

    e, top_k, hidden, inter = SHAPES[args.shape]
    rng = np.random.default_rng(args.seed)
    print(f"{args.shape}: {e} experts, top-{top_k}, hidden {hidden}, intermediate {inter}; "
          f"{args.tokens} tokens, {args.dtype}, GPTQ INT4 group {args.group_size}")
    t0 = time.perf_counter()
    w13 = _random_weights(rng, e, hidden, 2 * inter, args.group_size, "random w13 codes")
    w2 = _random_weights(rng, e, inter, hidden, args.group_size, "random w2 codes")
    s13 = fm.ExpertStack.from_gptq(w13, backend=args.backend, device=args.device, dtype=args.dtype)
    s2 = fm.ExpertStack.from_gptq(w2, backend=args.backend, device=args.device, dtype=args.dtype)
    print(f"random INT4 weights made and loaded in {time.perf_counter() - t0:.1f} s on backend '{s13.backend}' "
          f"({s13.device})")

    from ferrum_moe.testing import random_routing

    x = rng.standard_normal((args.tokens, hidden), dtype=np.float32)
    topk_weights, topk_ids = random_routing(rng, args.tokens, e, top_k)
    np_dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    xq = x.astype(np_dtype)
    host_in = xq, topk_weights, topk_ids
    if args.device != "cpu":
        import torch  # moves the inputs to the GPU; any DLPack library would do

        host_in = tuple(torch.from_dlpack(a if a.dtype != ml_dtypes.bfloat16 else a.view(np.uint16)).to(args.device)
                        for a in host_in)
        if args.dtype == "bfloat16":
            host_in = (host_in[0].view(torch.bfloat16),) + host_in[1:]
    layer = fm.MoE(s13, s2, top_k=top_k)
    y = layer(*host_in)  # warm-up: sizes the layer's workspace
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        y = layer(*host_in)
        if args.device != "cpu":
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    y = np.asarray(y.float().cpu() if hasattr(y, "cpu") else y, dtype=np.float64)

    ref = _reference(xq.astype(np.float64), w13, w2, topk_weights, topk_ids)
    active = len(np.unique(topk_ids))
    weight_bytes = active * sum(w.qweight.nbytes + w.scales.size * 2 for w in (w13[0], w2[0]))
    return _check_and_report(y, ref, args, seconds, "", active, weight_bytes, "INT4 weight traffic")


def _check_and_report(y, ref, args, seconds: float, what: str, active: int, weight_bytes: int, traffic: str) -> int:
    """Prints the error against the float64 reference and the speed; 1 when the
    result is off by more than the dtype allows."""
    rel = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
    tolerance = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}[args.dtype]
    print(f"relative error vs float64 reference: {rel:.2e} (tolerance {tolerance:.0e})")
    print(f"time: {seconds * 1e3:.2f} ms median of {args.repeats}{what}; {args.tokens / seconds:,.0f} tokens/s; "
          f"{active} active experts, {weight_bytes / seconds / 1e9:.2f} GB/s of {traffic}")
    if not np.isfinite(rel) or rel > tolerance:
        print("FAILED: the result does not match the reference", file=sys.stderr)
        return 1
    print("OK")
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _inspect(args) -> int:
    import ferrum_moe as fm
    from ferrum_moe.architectures import expert_indices, ranges
    from ferrum_moe.pretrained import expert_quant, layer_tensors, open_model, probe_backend

    ckpt, spec = open_model(args.path)
    with ckpt:
        quant = expert_quant(ckpt, spec)
        found = expert_indices(ckpt.names(), spec)
        tensors = {i: layer_tensors(ckpt, spec, i, found) for i in spec.moe_layers}
        dense = sorted(set(range(spec.num_layers)) - set(spec.moe_layers))
        print(f"{ckpt.path}")
        print(f"architecture: {spec.layout.title} (model_type {spec.model_type})")
        print(f"layers: {spec.num_layers}; MoE: {ranges(spec.moe_layers)}; dense: {ranges(dense)} ({spec.dense_rule})")
        print(f"experts: {spec.num_experts} per MoE layer, top-{spec.top_k}; hidden {spec.hidden}, "
              f"expert intermediate {spec.intermediate}")
        if spec.shared_intermediate:
            gate = ", scaled by sigmoid(shared_expert_gate)" if spec.layout.shared_gate else ""
            print(f"shared experts: one MLP ({spec.layout.shared}), intermediate {spec.shared_intermediate}{gate}")
        else:
            print("shared experts: none")
        print(f"routing: {spec.routing.describe()}")
        print(f"quantization of the experts: {quant.describe()} (from {quant.source})")
        if quant.modules_to_not_convert:
            print(f"  kept unquantized: {', '.join(quant.modules_to_not_convert)}")
        index = f", index {ckpt.index_file.name}" if ckpt.index_file else ""
        print(f"files: {len(ckpt.files)} .safetensors{index}")
        by_size: dict[int, list[int]] = {}
        for i, t in tensors.items():
            by_size.setdefault(t.nbytes, []).append(i)
        for nbytes, layers in by_size.items():
            print(f"bytes per MoE layer (experts, router, shared experts): {_size(nbytes)} (layer {ranges(layers)})")
        checkpoint_bytes = sum(ckpt.info(name).nbytes for name in ckpt.names())
        print(f"bytes in total: MoE layers {_size(sum(t.nbytes for t in tensors.values()))}; "
              f"the whole checkpoint {_size(checkpoint_bytes)}")
    print(f"backends ({args.dtype}):")
    for b in fm.backends():
        if not b.available:
            print(f"  {b.name:<8} unavailable: {b.error}")
            continue
        device = "cpu" if "cpu" in b.device_types else f"{b.device_types[0]}:0"
        reason = probe_backend(b.name, device, spec, quant, args.dtype)
        print(f"  {b.name:<8} {'can run it on ' + device if reason is None else 'cannot run it: ' + reason}")
    return 0


def _times_dequantized(x64: np.ndarray, w, columns: int = 1024) -> np.ndarray:
    """x64 @ W in float64, W dequantized ``columns`` columns at a time, so a
    large expert never lies on the host as a whole float64 matrix."""
    from ferrum_moe import GPTQWeight

    per = 32 // w.bits  # columns is a multiple of per, so each block's zero points are whole words
    out = np.empty((x64.shape[0], w.n))
    for c in range(0, w.n, columns):
        end = min(c + columns, w.n)
        qzeros = None if w.qzeros is None else w.qzeros[:, c // per:-(-end // per)]
        block = GPTQWeight(w.qweight[:, c:end], w.scales[:, c:end], qzeros, w.g_idx, bits=w.bits,
                           group_size=w.group_size, sym=w.sym, checkpoint_format=w.checkpoint_format, k=w.k)
        out[:, c:end] = x64 @ block.dequantize(np.float64)
    return out


def _silu_mlp(x64: np.ndarray, w13, w2) -> np.ndarray:
    h = _times_dequantized(x64, w13)
    gate, up = np.split(h, 2, axis=1)
    return _times_dequantized(gate / (1 + np.exp(-gate)) * up, w2)


def _run(args) -> int:
    import ml_dtypes

    import ferrum_moe as fm
    from ferrum_moe.architectures import expert_indices
    from ferrum_moe.pretrained import expert_quant, layer_tensors, open_model, read_mlp

    ckpt, spec = open_model(args.path)
    index = spec.moe_layers[0] if args.layer is None else spec.check_layer(args.layer)
    print(f"{spec.layout.title} layer {index}: {spec.num_experts} experts, top-{spec.top_k}, hidden {spec.hidden}, "
          f"intermediate {spec.intermediate}; {expert_quant(ckpt, spec).describe()}; {args.tokens} tokens, "
          f"{args.dtype}")
    t0 = time.perf_counter()
    layer = fm.MoE.from_pretrained(args.path, index, backend=args.backend, device=args.device, dtype=args.dtype)
    print(f"loaded in {time.perf_counter() - t0:.1f} s on backend '{layer.w13.backend}' ({layer.w13.device})")

    rng = np.random.default_rng(args.seed)
    bf16 = args.dtype == "bfloat16"
    x = rng.standard_normal((args.tokens, spec.hidden)).astype(ml_dtypes.bfloat16 if bf16 else np.dtype(args.dtype))
    x_in, synchronize = x, lambda: None
    if args.device != "cpu":
        import torch  # moves the inputs to the GPU; any DLPack library would do

        x_in = torch.from_numpy(x.view(np.uint16) if bf16 else x).to(args.device)
        x_in = x_in.view(torch.bfloat16) if bf16 else x_in
        synchronize = torch.cuda.synchronize
    y = layer.forward(x_in)  # warm-up: sizes the workspaces
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        y = layer.forward(x_in)
        synchronize()
        times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    y = np.asarray(y.float().cpu() if hasattr(y, "cpu") else y, dtype=np.float64)

    # The reference: the layer's own routing, each active expert read again
    # from the checkpoint and dequantized in float64, one at a time.
    topk_weights, topk_ids = layer.route(x)
    x64 = x.astype(np.float64)
    ref = np.zeros_like(x64)
    with ckpt:
        t = layer_tensors(ckpt, spec, index, expert_indices(ckpt.names(), spec))
        active = np.unique(topk_ids)
        for e in active:
            tokens, slots = np.nonzero(topk_ids == e)
            ref[tokens] += topk_weights[tokens, slots, None] * _silu_mlp(x64[tokens], *read_mlp(ckpt, t.experts[e]))
        weight_bytes = sum(t.experts[e].nbytes for e in active)
        if t.shared is not None:
            shared = _silu_mlp(x64, *read_mlp(ckpt, t.shared))
            if t.shared_gate is not None:
                shared *= 1 / (1 + np.exp(-(x64 @ ckpt.read(t.shared_gate).astype(np.float64).T)))
            ref += shared
            weight_bytes += t.shared.nbytes
    return _check_and_report(y, ref, args, seconds, " (route + experts + shared)", len(active), weight_bytes,
                             "quantized weights")


def _tune(args) -> int:
    import ferrum_moe as fm
    from ferrum_moe.testing import random_codes_weight

    if args.path is not None:
        from ferrum_moe.pretrained import expert_quant, open_model

        ckpt, spec = open_model(args.path)
        with ckpt:
            quant = expert_quant(ckpt, spec)
        e, top_k, hidden, inter = spec.num_experts, spec.top_k, spec.hidden, spec.intermediate
        bits, group_size, what = quant.bits, quant.group_size, f"{spec.layout.title} ({ckpt.path})"
        sym, act_order = quant.sym, quant.desc_act
    else:
        e, top_k, hidden, inter = SHAPES[args.shape]
        bits, group_size, what = args.bits, args.group_size, args.shape
        sym, act_order = True, False
    print(f"{what}: {e} experts, top-{top_k}, hidden {hidden}, intermediate {inter}; {args.dtype}, INT{bits} group "
          f"{group_size}{'' if sym else ', zero points'}{', act-order' if act_order else ''}")
    rng = np.random.default_rng(0)
    stacks = [fm.ExpertStack.from_gptq([random_codes_weight(rng, k, n, group_size=group_size, bits=bits, sym=sym,
                                                            act_order=act_order)
                                        for _ in _progress(range(e), desc)],
                                       backend=args.backend, device=args.device, dtype=args.dtype)
              for k, n, desc in ((hidden, 2 * inter, "random w13 codes"), (inter, hidden, "random w2 codes"))]
    print(f"backend '{stacks[0].backend}' ({stacks[0]._backend_description}); random tokens and routing; "
          "us per layer call by block size (* kept)")
    width = max(len(str(b)) for b in args.blocks) + 9
    print(f"{'tokens':>7} " + "".join(f"{'block ' + str(b):>{width}}" for b in args.blocks) + f"{'rule':>6}{'kept':>6}")

    def report(c) -> None:
        cells = "".join(f"{c.times_us[b]:>{width - 1}.1f}{'*' if b == c.block else ' '}" for b in args.blocks)
        print(f"{c.tokens:>7} {cells}{c.rule:>6}{c.block:>6}", flush=True)

    result = fm.tune_block_sizes(*stacks, top_k=top_k, token_counts=args.tokens, blocks=args.blocks,
                                 margin=args.margin, seconds=args.seconds, save=not args.no_save, progress=report)
    if result.path is not None:
        print(f"written to {result.path}: fused_moe and MoE take these blocks for this layer shape on this device")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ferrum-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, build, backends and devices")
    demo = sub.add_parser("demo", help="run a whole MoE layer on random GPTQ weights and check it")
    demo.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    demo.add_argument("--tokens", type=int, default=16)
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    demo.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    inspect = sub.add_parser("inspect", help="what a GPTQ/AWQ MoE checkpoint holds, and which backends can run it")
    inspect.add_argument("path", help="a model directory (config.json and .safetensors files)")
    inspect.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    run = sub.add_parser("run", help="load one MoE layer of a checkpoint, run it on random tokens and check it")
    run.add_argument("path", help="a model directory (config.json and .safetensors files)")
    run.add_argument("--layer", type=int, help="the MoE layer (default: the first)")
    run.add_argument("--tokens", type=int, default=16)
    run.add_argument("--backend", default="auto")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    run.add_argument("--repeats", type=int, default=5)
    run.add_argument("--seed", type=int, default=0)
    tune = sub.add_parser("tune", help="measure the routing block sizes of a layer shape here and keep the fastest")
    tune.add_argument("path", nargs="?", help="a model directory: its layer shape and quantization (default: --shape)")
    tune.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    tune.add_argument("--bits", type=int, choices=(4, 8), default=4, help="with --shape")
    tune.add_argument("--group-size", type=int, default=128, help="with --shape")
    tune.add_argument("--backend", default="auto")
    tune.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    tune.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    tune.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    tune.add_argument("--blocks", type=int, nargs="+", default=list(DEFAULT_BLOCKS),
                      help="routing blocks to time (0: pair routing, no align)")
    tune.add_argument("--margin", type=float, default=0.03, help="keep the rule's block within this of the fastest")
    tune.add_argument("--seconds", type=float, default=0.05, help="time per measurement")
    tune.add_argument("--no-save", action="store_true", help="print only; write no table")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command in ("inspect", "run", "tune"):
        from ferrum_moe import BackendUnavailableError

        if args.command == "run" and (args.tokens < 1 or args.repeats < 1):
            parser.error("--tokens and --repeats must be at least 1")
        try:
            return {"inspect": _inspect, "run": _run, "tune": _tune}[args.command](args)
        except (ValueError, NotImplementedError, BackendUnavailableError, OSError) as e:
            # A checkpoint or backend that cannot run it: the message is the answer, not a traceback.
            print(f"ferrum-moe {args.command}: {e}", file=sys.stderr)
            return 2
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
