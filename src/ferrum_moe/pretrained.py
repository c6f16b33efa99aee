"""Published GPTQ/AWQ MoE checkpoints as fm.MoE layers: the experts of each
requested layer read and checked, [gate | up] joined along N into w13, loaded
onto a backend, with the model's router and its shared experts attached.

Checks come in two passes: first every tensor a layer needs is looked up in
the shard headers (present, dtype, shape against config.json and the
quantization config), then the data is read one expert at a time and its values
checked (g_idx, zero points, biases). Host memory holds one layer's packed
tensors at most (twice, while the backend repacks them); other layers are not
touched."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from . import awq, gptq
from .architectures import ModelSpec, expert_indices, layer_indices, naming_found, parse
from .checkpoint import FLOAT_DTYPES, Checkpoint, CheckpointError, QuantConfig, TensorInfo, quote
from .discovery import get_backend, parse_device, resolve
from .gptq import GPTQWeight
from .moe import MoE, fused_moe
from .router import Router, host_float32, like
from .stack import ExpertStack, _check_dtype


def open_model(path) -> tuple[Checkpoint, ModelSpec]:
    """The checkpoint at ``path`` and what its config.json says (checked against
    the layers its tensors hold)."""
    ckpt = Checkpoint(path)
    return ckpt, parse(ckpt.config, str(ckpt.path / "config.json"), layer_indices(ckpt.names()))


@dataclasses.dataclass
class QuantizedModule:
    """The header entries of one quantized Linear (qweight, scales, and where
    present qzeros, g_idx, bias), checked against its [k, n] shape. A
    compressed-tensors Linear's tensors sit under the same roles (its
    weight_packed as qweight, weight_zero_point as qzeros, ..., weight_shape as
    shape) in their own [n, k] layout, until _from_compressed_tensors turns them."""

    name: str
    k: int
    n: int
    tensors: dict[str, TensorInfo]
    quant: QuantConfig  # its scheme (QuantConfig.for_module)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def quantized_module(ckpt: Checkpoint, name: str, k: int, n: int) -> QuantizedModule:
    """Looks up (headers only) the tensors of quantized Linear ``name`` with
    y = x @ W, W [k, n]."""
    q = ckpt.quant
    entry = q.not_converted_by(name)
    if entry is not None:
        key = "ignore" if q.method == "compressed-tensors" else "modules_to_not_convert"
        raise CheckpointError(f"{q.source}: {key} entry {quote(entry)} keeps {name} unquantized; ferrum-moe runs "
                              "quantized experts only")
    packed = "weight_packed" if q.method == "compressed-tensors" else "qweight"
    if not ckpt.has(f"{name}.{packed}") and ckpt.has(f"{name}.weight"):
        info = ckpt.info(f"{name}.weight")
        raise CheckpointError(f"{info.where()}: the checkpoint keeps {name} unquantized (a float weight, "
                              f"{info.dtype} {list(info.shape)}, and no {packed}); ferrum-moe runs quantized experts "
                              "only")
    q = q.for_module(name)
    groups = gptq.num_groups(k, q.group_size)
    group_what = f"{groups} groups of group_size {q.group_size} over K={k}, as {q.source} says"
    t: dict[str, TensorInfo] = {}
    if q.method == "compressed-tensors":
        # A Linear's own [n, k] layout: codes packed along k, scales and zero points per (column, group).
        t["qweight"] = ckpt.expect(f"{name}.weight_packed", ("I32",), (n, -(-k * q.bits // 32)),
                                   f"{q.bits}-bit codes of K={k} packed along K, a row per output column")
        t["scales"] = ckpt.expect(f"{name}.weight_scale", FLOAT_DTYPES, (n, groups), group_what)
        t["shape"] = ckpt.expect(f"{name}.weight_shape", ("I64", "I32"), (2,), f"[N, K] = [{n}, {k}]")
        if ckpt.has(f"{name}.weight_zero_point") or not q.sym:
            t["qzeros"] = ckpt.expect(f"{name}.weight_zero_point", ("I32",), (-(-n * q.bits // 32), groups),
                                      f"{q.bits}-bit zero points packed along N, {group_what}")
        if ckpt.has(f"{name}.weight_g_idx") or q.desc_act:
            t["g_idx"] = ckpt.expect(f"{name}.weight_g_idx", ("I32", "I64"), (k,), "the group of each input row")
    elif q.method == "awq":
        if n % 8:
            raise CheckpointError(f"{ckpt.path / 'config.json'}: N={n} of {name} (from its sizes) is not a multiple "
                                  "of 8, which AWQ's packing along N needs")
        t["qweight"] = ckpt.expect(f"{name}.qweight", ("I32",), (k, n // 8),
                                   f"AWQ: 4-bit codes of N={n} packed along N")
        t["qzeros"] = ckpt.expect(f"{name}.qzeros", ("I32",), (groups, n // 8), f"AWQ zero points, {group_what}")
        t["scales"] = ckpt.expect(f"{name}.scales", FLOAT_DTYPES, (groups, n), group_what)
    else:
        per = 32 // q.bits
        info = ckpt.info(f"{name}.qweight")
        want = (-(-k // per), n)
        if info.dtype == "I32" and len(info.shape) == 2 and info.shape[1] == n and info.shape != want:
            other = 12 - q.bits  # the other width ferrum-moe knows: 4 <-> 8
            found = f"; that packs {other}-bit codes" if info.shape[0] == -(-k // (32 // other)) else ""
            raise CheckpointError(f"{info.where()}: expected shape {list(want)} ({q.bits}-bit codes of K={k}, "
                                  f"{per} per int32, as {q.source} says bits {q.bits}); got {list(info.shape)}{found}")
        t["qweight"] = ckpt.expect(f"{name}.qweight", ("I32",), want, f"{q.bits}-bit codes of K={k} packed along K")
        info = ckpt.info(f"{name}.scales")
        if info.dtype in FLOAT_DTYPES and len(info.shape) == 2 and info.shape[1] == n and info.shape[0] != groups:
            raise CheckpointError(f"{info.where()}: expected shape {[groups, n]} ({group_what}); got "
                                  f"{list(info.shape)}, {info.shape[0]} groups: the group size disagrees")
        t["scales"] = ckpt.expect(f"{name}.scales", FLOAT_DTYPES, (groups, n), group_what)
        if ckpt.has(f"{name}.qzeros") or not q.sym:
            t["qzeros"] = ckpt.expect(f"{name}.qzeros", ("I32",), (groups, -(-n // per)),
                                      f"{q.bits}-bit zero points packed along N, {group_what}")
        if ckpt.has(f"{name}.g_idx") or q.desc_act:
            t["g_idx"] = ckpt.expect(f"{name}.g_idx", ("I32", "I64"), (k,), "the group of each input row")
    if ckpt.has(f"{name}.bias"):
        t["bias"] = ckpt.expect(f"{name}.bias", FLOAT_DTYPES, (n,), "one per output column")
    return QuantizedModule(name, k, n, t, q)


def read_finite(ckpt: Checkpoint, info: TensorInfo, dtype: str | None = None) -> np.ndarray:
    """The data of float tensor ``info``, refused if any value is NaN or
    infinite: scales, routers and their biases never are, and one NaN scale
    turns the output of every token routed to its expert into NaN. ``dtype``:
    the activation dtype the values will be cast to; for float16, values past
    its range (bfloat16 and float32 files can hold them) are refused too, as
    the cast would make them infinite."""
    a = ckpt.read(info)
    values = a.astype(np.float32)
    _refuse_any(info, ~np.isfinite(values), "are NaN or infinite", ": the file is damaged")
    if dtype == "float16":
        _refuse_any(info, np.abs(values) > np.finfo(np.float16).max, "exceed float16's range (65504)",
                    ": load the layers with dtype='bfloat16' or 'float32'")
    return a


def _refuse_any(info: TensorInfo, bad: np.ndarray, what: str, advice: str) -> None:
    if bad.any():
        first = [int(i) for i in np.unravel_index(np.argmax(bad), bad.shape)]
        raise CheckpointError(f"{info.where()}: {int(bad.sum())} of its values {what} (the first at {first}){advice}")


def read_module(ckpt: Checkpoint, module: QuantizedModule, dtype: str | None = None) -> GPTQWeight:
    """The data of ``module`` as a GPTQWeight, its values checked (its scales
    against ``dtype``, the activation dtype, as read_finite says)."""
    q = module.quant
    a = {key: read_finite(ckpt, info, dtype) if key == "scales" else ckpt.read(info)
         for key, info in module.tensors.items()}

    if "bias" in a and np.any(a["bias"].astype(np.float32) != 0):
        raise CheckpointError(f"{module.tensors['bias'].where()}: a nonzero bias; ferrum-moe's MoE experts have "
                              "none (Mixtral, Qwen-MoE and DeepSeek experts are bias-free)")
    if q.method == "awq":
        return awq.to_gptq(a["qweight"], a["qzeros"], a["scales"], q.group_size)
    if q.method == "compressed-tensors":
        a = _from_compressed_tensors(module, a, q.bits)
    g_idx = a.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.astype(np.int64)
        groups = gptq.num_groups(module.k, q.group_size)
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
            raise CheckpointError(f"{module.tensors['g_idx'].where()}: values must be group indices in [0, {groups}); "
                                  f"got [{g_idx.min()}, {g_idx.max()}]")
        in_order = np.zeros(module.k, np.int64) if q.group_size == -1 else np.arange(module.k) // q.group_size
        if np.array_equal(g_idx, in_order):
            g_idx = None  # rows in group order: the plain (faster) path computes the same
        elif not q.desc_act:
            raise CheckpointError(f"{module.tensors['g_idx'].where()}: rows are not in group order (k // "
                                  f"{q.group_size}), but {q.source} says desc_act false: the config and the tensors "
                                  "disagree")
    fmt = "gptq_v2" if q.method == "compressed-tensors" else q.checkpoint_format  # its zero points are true ones
    w = GPTQWeight(a["qweight"], a["scales"], a.get("qzeros"), g_idx, bits=q.bits, group_size=q.group_size,
                   sym=q.sym, checkpoint_format=fmt, k=module.k)
    if w.qzeros is None:
        return w
    zeros = w.zeros()
    if zeros.max() > 255:  # only 8-bit v1 gets here: its stored zero - 1 of 0xFF means 256
        g, col = (int(i) for i in np.unravel_index(np.argmax(zeros), zeros.shape))
        raise CheckpointError(
            f"{module.tensors['qzeros'].where()}: the stored 8-bit v1 zero point of group {g}, column {col} is 0xFF, "
            "which means a zero point of 256, outside the [0, 255] that kernels hold; such a checkpoint is not "
            "supported")
    if q.sym:
        mid = 1 << (q.bits - 1)
        if np.any(zeros != mid):
            raise CheckpointError(
                f"{module.tensors['qzeros'].where()}: {q.source} says sym true, but the zero points range over "
                f"[{zeros.min()}, {zeros.max()}] (symmetric {q.bits}-bit weights have {mid} everywhere; "
                f"checkpoint_format {q.checkpoint_format}): the config and the tensors disagree")
        w.qzeros = None  # all at the midpoint: the stack needs no zero points
    return w


def _from_compressed_tensors(module: QuantizedModule, a: dict, bits: int) -> dict:
    """A pack-quantized Linear's tensors (under QuantizedModule's roles, in its
    [n, k] layout) in GPTQ's layout, with the true zero points. Its stored codes
    and zero points are the signed values plus 2^(bits-1), so code - zero is
    the same in both."""
    shape = a["shape"].astype(np.int64).tolist()
    if shape != [module.n, module.k]:
        raise CheckpointError(f"{module.tensors['shape'].where()}: holds {shape}; the layer's sizes make "
                              f"{module.name} [N, K] = [{module.n}, {module.k}]")
    codes = gptq.unpack(a["qweight"], bits, module.k, axis=1)  # [n, k]
    out = {"qweight": gptq.pack(codes.T, bits, axis=0), "scales": np.ascontiguousarray(a["scales"].T)}
    if "qzeros" in a:
        zeros = gptq.unpack(a["qzeros"], bits, module.n, axis=0)  # [n, groups]
        out["qzeros"] = gptq.pack(zeros.T, bits, axis=1)
    if "g_idx" in a and not np.any(a["g_idx"] == -1):  # -1: never set, the rows are in order
        out["g_idx"] = a["g_idx"]
    return out


def join_gate_up(gate: GPTQWeight, up: GPTQWeight, where: str) -> GPTQWeight:
    """w13 = [gate | up] along N: the codes and scales side by side, the stored
    zero points repacked (gate's N need not fill whole words). ``where`` names
    their g_idx tensors, if any."""
    if (gate.g_idx is None) != (up.g_idx is None) or gate.g_idx is not None and not np.array_equal(gate.g_idx,
                                                                                                   up.g_idx):
        raise CheckpointError(f"{where}: gate and up have different g_idx (act-order); ferrum-moe runs [gate | up] "
                              "as one matrix, so they must share one")
    qzeros = None
    if gate.qzeros is not None:  # both or neither: one quantization config
        stored = [gptq.unpack(w.qzeros, w.bits, w.n, axis=1) for w in (gate, up)]
        qzeros = gptq.pack(np.concatenate(stored, axis=1), gate.bits, axis=1)
    return GPTQWeight(np.concatenate([gate.qweight, up.qweight], axis=1),
                      np.concatenate([gate.scales, up.scales], axis=1), qzeros, gate.g_idx, bits=gate.bits,
                      group_size=gate.group_size, sym=gate.sym, checkpoint_format=gate.checkpoint_format,
                      k=gate.k)


@dataclasses.dataclass
class MLPModules:
    """gate, up and down of one expert (or of the shared expert MLP)."""

    gate: QuantizedModule
    up: QuantizedModule
    down: QuantizedModule

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


def _mlp(ckpt: Checkpoint, name, hidden: int, intermediate: int) -> MLPModules:
    return MLPModules(quantized_module(ckpt, name("gate"), hidden, intermediate),
                      quantized_module(ckpt, name("up"), hidden, intermediate),
                      quantized_module(ckpt, name("down"), intermediate, hidden))


def read_mlp(ckpt: Checkpoint, m: MLPModules, dtype: str | None = None) -> tuple[GPTQWeight, GPTQWeight]:
    """(w13 = [gate | up], w2 = down) of one expert, to run in activation dtype ``dtype``."""
    gate, up = read_module(ckpt, m.gate, dtype), read_module(ckpt, m.up, dtype)
    g_idx = " and ".join(module.tensors["g_idx"].where() for module in (m.gate, m.up) if "g_idx" in module.tensors)
    return join_gate_up(gate, up, g_idx), read_module(ckpt, m.down, dtype)


@dataclasses.dataclass
class LayerTensors:
    """Every tensor one MoE layer needs, looked up and checked in the headers."""

    layer: int
    router: TensorInfo
    correction_bias: TensorInfo | None
    experts: list[MLPModules]
    shared: MLPModules | None
    shared_gate: TensorInfo | None

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.router, self.correction_bias, self.shared_gate) if t is not None]
        return (sum(e.nbytes for e in self.experts) + (self.shared.nbytes if self.shared else 0)
                + sum(t.nbytes for t in extra))


def layer_tensors(ckpt: Checkpoint, spec: ModelSpec, layer: int, experts_found: dict[int, set[int]]) -> LayerTensors:
    """Looks up (headers only) what MoE layer ``layer`` needs; ``experts_found``
    is expert_indices() of the checkpoint's names."""
    router_name = spec.router_weight(layer)
    if not ckpt.has(router_name):
        naming = naming_found(ckpt.names(), layer)
        found = f"; its experts are named {naming}, another architecture's layout" if naming else ""
        raise CheckpointError(f"{spec.source}: model_type {spec.model_type!r} ({spec.layout.title}) puts layer "
                              f"{layer}'s router at {router_name}, but no file of {ckpt.path} holds it{found}")
    e = spec.num_experts
    present = experts_found.get(layer, set())
    extra = sorted(i for i in present if i >= e)
    if extra:
        raise CheckpointError(f"{ckpt.path}: layer {layer} has tensors of expert {extra[0]} "
                              f"({spec.expert(layer, extra[0], 'gate')}...), but {spec.source} says {e} experts")
    if len(present) < e:
        first = next(i for i in range(e) if i not in present)  # at most len(present) + 1 steps
        raise CheckpointError(f"{ckpt.path}: layer {layer} is missing expert {first}: no tensor "
                              f"{spec.expert(layer, first, 'gate')}.* ({spec.source} says {e} experts; "
                              f"{len(present)} are present)")
    router = ckpt.expect(router_name, FLOAT_DTYPES, (e, spec.hidden), "[num_experts, hidden]")
    bias = None
    if spec.routing.topk_method == "noaux_tc":
        bias = ckpt.expect(spec.correction_bias(layer), FLOAT_DTYPES, (e,), "one per expert")
    experts = [_mlp(ckpt, lambda role, i=i: spec.expert(layer, i, role), spec.hidden, spec.intermediate)
               for i in range(e)]
    shared = shared_gate = None
    if spec.shared_intermediate:
        shared = _mlp(ckpt, lambda role: spec.shared(layer, role), spec.hidden, spec.shared_intermediate)
        if spec.layout.shared_gate:
            shared_gate = ckpt.expect(spec.shared_gate_weight(layer), FLOAT_DTYPES, (1, spec.hidden), "[1, hidden]")
    return LayerTensors(layer, router, bias, experts, shared, shared_gate)


class SharedExpert:
    """A layer's shared expert MLP, run on every token: a one-expert fm.MoE (the
    backend computes silu(x @ gate) * (x @ up) @ down), scaled per token by
    sigmoid(x @ gate_weight.T) where the model has a shared expert gate
    (Qwen2-MoE; gate_weight float32 [1, hidden])."""

    def __init__(self, mlp: MoE, gate_weight: np.ndarray | None = None):
        self.mlp = mlp
        self.gate_weight = None if gate_weight is None else np.asarray(gate_weight, np.float32)

    def __repr__(self) -> str:
        return (f"SharedExpert(intermediate={self.mlp.w2.k}, gated={self.gate_weight is not None}, "
                f"backend={self.mlp.w13.backend!r})")

    def __call__(self, hidden_states, *, stream=None):
        num_tokens = hidden_states.shape[0]
        if self.gate_weight is None:
            weights = np.ones((num_tokens, 1), np.float32)
        else:
            logits = host_float32(hidden_states, "hidden_states") @ self.gate_weight.T
            weights = (0.5 * np.tanh(0.5 * logits) + 0.5).astype(np.float32)  # sigmoid, no overflow
        ids = np.zeros((num_tokens, 1), np.int32)
        return self.mlp(hidden_states, like(weights, hidden_states), like(ids, hidden_states), stream=stream)


def forward(layer: MoE, hidden_states, stream=None):
    """route -> fused_moe (+ the shared expert): the layer's whole output."""
    topk_weights, topk_ids = layer.route(hidden_states)
    out = layer(hidden_states, topk_weights, topk_ids, stream=stream)
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(hidden_states, stream=stream)
    return out


def _to_stack(weights: list[GPTQWeight], what: str, backend, device, dtype) -> ExpertStack:
    try:
        return ExpertStack.from_gptq(weights, backend=backend, device=device, dtype=dtype)
    except NotImplementedError as e:
        w = weights[0]
        raise NotImplementedError(
            f"{what} ({len(weights)} x [K={w.k}, N={w.n}], {w.bits}-bit, group_size {w.group_size}"
            f"{', zero points' if w.qzeros is not None else ''}{', act-order' if w.g_idx is not None else ''}, "
            f"{dtype}): backend '{backend}' cannot run it: {e}") from None


def _read_layer(ckpt: Checkpoint, spec: ModelSpec, t: LayerTensors, backend: str, device, dtype: str, bar) -> MoE:
    w13, w2 = [], []
    for modules in t.experts:
        a, b = read_mlp(ckpt, modules, dtype)
        w13.append(a)
        w2.append(b)
        bar.update(1)
    where = f"{ckpt.path}: layer {t.layer}"
    layer = MoE(_to_stack(w13, f"{where}: experts' w13 [gate | up]", backend, device, dtype),
                _to_stack(w2, f"{where}: experts' w2 (down)", backend, device, dtype), top_k=spec.top_k)
    del w13, w2
    bias = None if t.correction_bias is None else read_finite(ckpt, t.correction_bias)
    layer.router = Router(read_finite(ckpt, t.router), spec.routing, bias)
    if t.shared is not None:
        a, b = read_mlp(ckpt, t.shared, dtype)
        mlp = MoE(_to_stack([a], f"{where}: shared expert's w13", backend, device, dtype),
                  _to_stack([b], f"{where}: shared expert's w2", backend, device, dtype), top_k=1)
        layer.shared_expert = SharedExpert(mlp, None if t.shared_gate is None else read_finite(ckpt, t.shared_gate))
        bar.update(1)
    return layer


def load_moe_layers(path, layers=None, *, backend: str = "auto", device="cpu", dtype: str = "float16",
                    progress: bool = True) -> dict[int, MoE]:
    """The MoE layers of a published GPTQ/AWQ checkpoint directory, as fm.MoE
    layers with the model's router (``layer.route``) and shared experts
    (``layer.forward`` runs all of it).

    path: a directory with config.json (with quantization_config, or a
    quantize_config.json beside it) and .safetensors files (sharded with
    model.safetensors.index.json). layers: an int or a list of layer indices;
    None loads every MoE layer. Returns {layer index: MoE}. A checkpoint that
    cannot be run as it is raises fm.CheckpointError (a ValueError) naming the
    file and the tensor; a backend that cannot run its format raises
    NotImplementedError with the backend's reason. ``progress`` shows a tqdm
    bar over the experts read.
    """
    from tqdm import tqdm

    b = resolve(backend, parse_device(device)).name  # a wrong backend, device or dtype fails before any reading
    dtype = _check_dtype(dtype)
    ckpt, spec = open_model(path)
    with ckpt:
        wanted = list(spec.moe_layers) if layers is None else \
            [layers] if isinstance(layers, numbers.Integral) else list(layers)
        wanted = list(dict.fromkeys(spec.check_layer(i) for i in wanted))
        found = expert_indices(ckpt.names(), spec)
        tensors = [layer_tensors(ckpt, spec, i, found) for i in wanted]  # every header check before any data
        total = sum(len(t.experts) + (t.shared is not None) for t in tensors)
        with tqdm(total=total, unit="expert", desc=f"loading {ckpt.path.name}", disable=not progress) as bar:
            return {t.layer: _read_layer(ckpt, spec, t, b, device, dtype, bar) for t in tensors}


def _probe_weight(k: int, n: int, bits: int, group_size: int, asym: bool, act_order: bool) -> GPTQWeight:
    per = 32 // bits
    groups = gptq.num_groups(k, group_size)
    qzeros = np.zeros((groups, -(-n // per)), np.int32) if asym else None  # zero point 0: not the midpoint
    g_idx = (np.arange(k)[::-1] * groups // k).astype(np.int32) if act_order else None  # rows out of group order
    return GPTQWeight(np.zeros((-(-k // per), n), np.int32), np.ones((groups, n), np.float16), qzeros, g_idx,
                      bits=bits, group_size=group_size, sym=not asym, checkpoint_format="gptq_v2", k=k)


def expert_quant(ckpt: Checkpoint, spec: ModelSpec) -> QuantConfig:
    """The scheme of the model's experts (the first MoE layer's first gate
    projection's: a checkpoint quantizes its experts alike)."""
    return ckpt.quant.for_module(spec.expert(spec.moe_layers[0], 0, "gate"))


def probe_backend(backend: str, device, spec: ModelSpec, quant: QuantConfig, dtype: str) -> str | None:
    """None if ``backend`` can run this model's MoE layers on ``device`` in
    ``dtype``, else its reason. Loads one expert of each shape the model has
    (zero codes, the checkpoint's bits, group size, zero points and act-order)
    and runs the layer on zero tokens, so every operation is asked for."""
    asym, act_order = quant.method == "awq" or not quant.sym, quant.desc_act
    try:
        b = get_backend(backend)
        dev = parse_device(device)
        sizes = [spec.intermediate] + ([spec.shared_intermediate] if spec.shared_intermediate else [])
        for inter in dict.fromkeys(sizes):
            w13 = _probe_weight(spec.hidden, 2 * inter, quant.bits, quant.group_size, asym, act_order)
            w2 = _probe_weight(inter, spec.hidden, quant.bits, quant.group_size, asym, act_order)
            s13, s2 = (ExpertStack.from_gptq([w], backend=backend, device=device, dtype=dtype) for w in (w13, w2))
            x, weights, ids = (b.empty(dev[0], dev[1], t, [0, width], 0)
                               for t, width in ((dtype, spec.hidden), ("float32", 1), ("int32", 1)))
            fused_moe(x, s13, s2, weights, ids)
    except Exception as e:  # a probe reports why, it does not stop
        return f"{type(e).__name__}: {e}"
    return None
