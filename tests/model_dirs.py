"""Small model directories written on the fly in the published layouts, and the
float64 reference of what a MoE layer of them computes.

Everything here is independent of ferrum_moe's own readers: the GPTQ and AWQ
packers, the dequantization and the routing rules are written again, plainly
(per-token loops), from the formats' and the models' definitions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot i of an AWQ word holds column 8j + AWQ_ORDER[i]
NAMES = {  # model_type: (MoE block, (gate, up, down), shared expert module, shared expert gate)
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), None, None),
    "minimax_m2": ("block_sparse_moe", ("w1", "w3", "w2"), None, None),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert", "shared_expert_gate"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None, None),
    "qwen3_next": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert", "shared_expert_gate"),
    "deepseek_v2": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None),
    "kimi_k2": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None),
    "glm4_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None),
    "dots1": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None, None),
}


def pack_along_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """int32 words: word r of column c holds rows r*per .. r*per+per-1, the
    first in the lowest bits (zero-padded at the end)."""
    per = 32 // bits
    rows = -(-codes.shape[0] // per)
    words = np.zeros((rows, codes.shape[1]), np.uint64)
    for r in range(codes.shape[0]):
        words[r // per] += codes[r].astype(np.uint64) << np.uint64(bits * (r % per))
    return words.astype(np.uint32).view(np.int32)


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """AWQ gemm words along N: [R, N] codes -> int32 [R, N/8]."""
    words = np.zeros((codes.shape[0], codes.shape[1] // 8), np.uint64)
    for j in range(words.shape[1]):
        for slot, col in enumerate(AWQ_ORDER):
            words[:, j] += codes[:, 8 * j + col].astype(np.uint64) << np.uint64(4 * slot)
    return words.astype(np.uint32).view(np.int32)


@dataclasses.dataclass
class Quant:
    """How a test checkpoint is quantized: method "gptq" (checkpoint_format
    "gptq" or "gptq_v2"), "awq" or "compressed-tensors" (pack-quantized)."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 32
    sym: bool = True
    act_order: bool = False
    checkpoint_format: str = "gptq"

    def config(self) -> dict:
        if self.method == "compressed-tensors":  # as llm-compressor writes a W4A16 / W8A16 model
            weights = {"num_bits": self.bits, "type": "int", "symmetric": self.sym, "dynamic": False,
                       "strategy": "channel" if self.group_size == -1 else "group",
                       "group_size": None if self.group_size == -1 else self.group_size,
                       "actorder": "group" if self.act_order else None, "observer": "minmax"}
            return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                                  "output_activations": None, "format": "pack-quantized"}},
                    "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"],
                    "kv_cache_scheme": None}
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": ["gate"]}
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.act_order, "checkpoint_format": self.checkpoint_format, "damp_percent": 0.01,
                "true_sequential": True, "static_groups": False}


def quantized_linear(rng, k: int, n: int, q: Quant, g_idx=None):
    """Random codes, zero points and scales of a [k, n] matrix (y = x @ W):
    (tensors as the format stores them, W dequantized in float64, g_idx)."""
    maxq = (1 << q.bits) - 1
    groups = 1 if q.group_size == -1 else -(-k // q.group_size)
    if g_idx is None:
        if q.act_order:
            g_idx = (rng.permutation(k) * groups // k).astype(np.int32)
        else:
            g_idx = (np.zeros(k) if q.group_size == -1 else np.arange(k) // q.group_size).astype(np.int32)
    codes = rng.integers(0, maxq + 1, (k, n))
    if q.sym:
        zeros = np.full((groups, n), 1 << (q.bits - 1))
    else:  # GPTQ v1 stores zero - 1, so its zeros start at 1
        zeros = rng.integers(1 if q.checkpoint_format == "gptq" and q.method == "gptq" else 0, maxq + 1, (groups, n))
    scales = ((rng.random((groups, n)) + 0.5) / (maxq * np.sqrt(k))).astype(np.float16)
    dense = (codes - zeros[g_idx]) * scales.astype(np.float64)[g_idx]
    if q.method == "awq":
        tensors = {"qweight": pack_awq(codes), "qzeros": pack_awq(zeros), "scales": scales}
    elif q.method == "compressed-tensors":
        # The Linear's [n, k] layout: codes (signed value + 2^(bits-1)) packed along k, per-column scales and zero
        # points (packed along n), the shape.
        tensors = {"weight_packed": pack_along_rows(codes, q.bits).T.copy(), "weight_scale": scales.T.copy(),
                   "weight_shape": np.array([n, k], np.int64)}
        if not q.sym:
            tensors["weight_zero_point"] = pack_along_rows(zeros.T, q.bits)
        if q.act_order:
            tensors["weight_g_idx"] = g_idx
    else:
        stored = zeros - 1 if q.checkpoint_format == "gptq" else zeros
        tensors = {"qweight": pack_along_rows(codes, q.bits), "qzeros": pack_along_rows(stored.T, q.bits).T.copy(),
                   "scales": scales, "g_idx": g_idx}
    return tensors, dense, g_idx


@dataclasses.dataclass
class LayerRef:
    """The float64 truth of one MoE layer of a written checkpoint."""

    router: np.ndarray  # [E, hidden], the stored values
    bias: np.ndarray | None  # e_score_correction_bias [E]
    experts: list  # (gate [hidden, I], up [hidden, I], down [I, hidden]) float64
    shared: tuple | None
    shared_gate: np.ndarray | None  # [1, hidden]


def silu_mlp(x, gate, up, down):
    g, u = x @ gate, x @ up
    return (g / (1.0 + np.exp(-g)) * u) @ down


SIGMOID_ROUTED = ("deepseek_v3", "kimi_k2", "glm4_moe", "dots1", "minimax_m2")  # sigmoid scores, noaux_tc


def reference_route(config: dict, ref: LayerRef, x64: np.ndarray):
    """Per token, [(expert, weight)] by the model's rule, a plain loop in float64."""
    mt = config["model_type"]
    top_k = config["num_experts_per_tok"]
    out = []
    for row in x64 @ ref.router.T:
        e = len(row)
        if mt in SIGMOID_ROUTED:
            scores = [1.0 / (1.0 + np.exp(-v)) for v in row]
        else:
            m = max(row)
            exp = [np.exp(v - m) for v in row]
            scores = [v / sum(exp) for v in exp]
        choice = [s + (ref.bias[i] if ref.bias is not None else 0.0) for i, s in enumerate(scores)]
        allowed = set(range(e))
        method = config.get("topk_method", "noaux_tc" if mt in SIGMOID_ROUTED else "greedy")
        if method != "greedy":
            n_group = config.get("n_group", 1)
            size = e // n_group
            groups = []
            for g in range(n_group):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                groups.append((sum(members[:2]) if method == "noaux_tc" else members[0], g))
            kept = [g for _, g in sorted(groups, reverse=True)[:config.get("topk_group", 1)]]
            allowed = {g * size + i for g in kept for i in range(size)}
        chosen = sorted(allowed, key=lambda i: -choice[i])[:top_k]
        weights = [scores[i] for i in chosen]
        norm = config.get("norm_topk_prob", mt in ("glm4_moe", "qwen3_next"))  # the transformers classes' defaults
        renormalize = {"mixtral": True, "minimax_m2": True, "qwen2_moe": norm, "qwen3_moe": norm, "qwen3_next": norm,
                       "olmoe": norm, "glm4_moe": norm, "dots1": norm}.get(mt, top_k > 1 and norm)
        if renormalize:
            weights = [w / sum(weights) for w in weights]
        if mt in SIGMOID_ROUTED or mt == "deepseek_v2" and not renormalize:  # DeepSeek's own code
            weights = [w * config.get("routed_scaling_factor", 1.0) for w in weights]
        out.append(list(zip(chosen, weights)))
    return out


def reference_forward(config: dict, ref: LayerRef, x64: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x64)
    for t, pairs in enumerate(reference_route(config, ref, x64)):
        for e, w in pairs:
            out[t] += w * silu_mlp(x64[t], *ref.experts[e])
    if ref.shared is not None:
        shared = silu_mlp(x64, *ref.shared)
        if ref.shared_gate is not None:
            shared *= 1.0 / (1.0 + np.exp(-(x64 @ ref.shared_gate.T)))
        out += shared
    return out


def base_config(model_type: str, *, hidden=64, intermediate=48, experts=8, top_k=2, layers=2, **extra) -> dict:
    """A config.json as published models write it (keys of the transformers
    configuration classes)."""
    c = {"architectures": [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                            "qwen3_moe": "Qwen3MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
                            "deepseek_v2": "DeepseekV2ForCausalLM",
                            "deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
                            "glm4_moe": "Glm4MoeForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM",
                            "dots1": "Dots1ForCausalLM", "olmoe": "OlmoeForCausalLM"}[model_type]],
         "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
         "hidden_act": "silu", "vocab_size": 32, "torch_dtype": "float16", "num_experts_per_tok": top_k,
         "intermediate_size": 96}
    if model_type in ("mixtral", "minimax_m2"):
        c.update(num_local_experts=experts, intermediate_size=intermediate)
    elif model_type == "olmoe":
        c.update(num_experts=experts, intermediate_size=intermediate, norm_topk_prob=False)
    elif model_type in ("glm4_moe", "dots1"):
        # As GLM-4.5-Air and dots.llm1 publish them: no topk_method or
        # scoring_func keys; one group; renormalised (GLM) or not (dots).
        c.update(n_routed_experts=experts, moe_intermediate_size=intermediate, n_shared_experts=1,
                 first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.5,
                 norm_topk_prob=model_type == "glm4_moe")
    elif model_type.startswith("qwen"):
        c.update(num_experts=experts, moe_intermediate_size=intermediate, decoder_sparse_step=1, mlp_only_layers=[],
                 norm_topk_prob={"qwen3_moe": True, "qwen2_moe": False}.get(model_type))  # qwen3_next: the default
        if model_type != "qwen3_moe":
            c["shared_expert_intermediate_size"] = 80
    else:
        v3 = model_type in ("deepseek_v3", "kimi_k2")
        c.update(n_routed_experts=experts, moe_intermediate_size=intermediate, n_shared_experts=1,
                 first_k_dense_replace=1, moe_layer_freq=1, n_group=4, topk_group=2,
                 topk_method="noaux_tc" if v3 else "group_limited_greedy", scoring_func="sigmoid" if v3 else "softmax",
                 routed_scaling_factor=2.5 if v3 else 16.0, norm_topk_prob=v3)
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}  # None: leave the key out (its default applies)


def moe_layers(c: dict) -> list[int]:
    """The MoE layers by the architectures' own rules, restated."""
    n, mt = c["num_hidden_layers"], c["model_type"]
    if mt in ("mixtral", "olmoe", "minimax_m2"):
        return list(range(n))
    if mt.startswith("qwen"):
        return [i for i in range(n) if i not in c["mlp_only_layers"] and (i + 1) % c["decoder_sparse_step"] == 0]
    return [i for i in range(c["first_k_dense_replace"], n) if i % c.get("moe_layer_freq", 1) == 0]


def write_model(path: Path, config: dict, q: Quant, rng, *, shards: int = 1, separate_quant_file: bool = False,
                router_dtype=ml_dtypes.bfloat16) -> dict[int, LayerRef]:
    """Writes a quantized MoE model directory at ``path``: config.json (with
    quantization_config, or beside it quantize_config.json), its tensors in
    ``shards`` .safetensors files (with model.safetensors.index.json when more
    than one). Returns each MoE layer's float64 truth."""
    path.mkdir(parents=True, exist_ok=True)
    mt = config["model_type"]
    block, proj, shared_name, shared_gate_name = NAMES[mt]
    hidden = config["hidden_size"]
    inter = config.get("moe_intermediate_size", config["intermediate_size"])
    num_experts = config.get("num_local_experts") or config.get("num_experts") or config["n_routed_experts"]
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((32, hidden)).astype(np.float16)}
    refs = {}

    def mlp(prefix, intermediate):
        gate_t, gate, g_idx = quantized_linear(rng, hidden, intermediate, q)
        up_t, up, _ = quantized_linear(rng, hidden, intermediate, q, g_idx)  # act-order: gate and up share g_idx
        down_t, down, _ = quantized_linear(rng, intermediate, hidden, q)
        for name, t in zip(proj, (gate_t, up_t, down_t)):
            tensors.update({f"{prefix}.{name}.{key}": value for key, value in t.items()})
        return gate, up, down

    moe = moe_layers(config)
    for layer in range(config["num_hidden_layers"]):
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(hidden, np.float16)
        attn, _, _ = quantized_linear(rng, hidden, hidden, q)
        tensors.update({f"model.layers.{layer}.self_attn.q_proj.{key}": v for key, v in attn.items()})
        if layer not in moe:
            mlp(f"model.layers.{layer}.mlp", config["intermediate_size"])
            continue
        prefix = f"model.layers.{layer}.{block}"
        router = (rng.standard_normal((num_experts, hidden)) / np.sqrt(hidden) * 4).astype(router_dtype)
        tensors[f"{prefix}.gate.weight"] = router
        bias = None
        if mt in SIGMOID_ROUTED:
            bias = (rng.standard_normal(num_experts) * 0.1).astype(np.float32)
            where = "e_score_correction_bias" if mt == "minimax_m2" else "gate.e_score_correction_bias"
            tensors[f"{prefix}.{where}"] = bias
        experts = [mlp(f"{prefix}.experts.{e}", inter) for e in range(num_experts)]
        shared = shared_gate = None
        n_shared = config.get("n_shared_experts", 1 if mt == "glm4_moe" else 0)  # GLM-4.5's default: one
        if shared_name and (mt in ("qwen2_moe", "qwen3_next") or n_shared):
            size = config["shared_expert_intermediate_size"] if mt.startswith("qwen") else inter * n_shared
            shared = mlp(f"{prefix}.{shared_name}", size)
            if shared_gate_name:
                shared_gate = (rng.standard_normal((1, hidden)) / np.sqrt(hidden)).astype(router_dtype)
                tensors[f"{prefix}.{shared_gate_name}.weight"] = shared_gate
        refs[layer] = LayerRef(router.astype(np.float64), None if bias is None else bias.astype(np.float64), experts,
                               shared, None if shared_gate is None else shared_gate.astype(np.float64))
    tensors["model.norm.weight"] = np.ones(hidden, np.float16)
    tensors["lm_head.weight"] = rng.standard_normal((32, hidden)).astype(np.float16)

    config = dict(config)
    if separate_quant_file:
        (path / "quantize_config.json").write_text(json.dumps(q.config(), indent=2))
    else:
        config["quantization_config"] = q.config()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tensors(path, tensors, shards)
    return refs


def write_tensors(path: Path, tensors: dict, shards: int = 1) -> None:
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return
    weight_map = {}
    size = -(-len(names) // shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * size:(s + 1) * size]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    total = sum(a.nbytes for a in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
