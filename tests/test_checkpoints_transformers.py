"""The published layouts as transformers itself writes them: a tiny model of each
architecture saved with save_pretrained (sharded, with its index), its MLP
projections replaced by GPTQ/AWQ tensors, must load with one call and compute
what transformers' own MoE block computes on the dequantized weights, in
float64. Skipped where transformers is not installed (the hand-written layouts
of test_checkpoints.py cover every architecture without it)."""

import json
import re

import numpy as np
import pytest

import ferrum_moe as fm

from conftest import REL_TOL, random_activations, rel_error
from model_dirs import Quant, quantized_linear

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

TINY = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
           n_group=4, topk_group=2)
MODELS = {  # id: (config class, model class, config arguments, quantization)
    "mixtral-gptq-v1-sym": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2),
                            Quant()),
    "qwen2_moe-gptq-int8-asym": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80),
        Quant(bits=8, sym=False)),
    "qwen3_moe-gptq-v2-act-order": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True),
        Quant(sym=False, act_order=True, checkpoint_format="gptq_v2", group_size=16)),
    "deepseek_v2-gptq-group-limited": (
        "DeepseekV2Config", "DeepseekV2ForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, n_shared_experts=2, q_lora_rank=None,
             topk_method="group_limited_greedy", routed_scaling_factor=2.0, **MLA),
        Quant(bits=8, act_order=True)),
    "qwen3_next-gptq-shared-gate": (
        "Qwen3NextConfig", "Qwen3NextForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
             head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
             linear_value_head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"]),
        Quant()),
    "glm4_moe-gptq-grouped": (
        "Glm4MoeConfig", "Glm4MoeForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, n_shared_experts=1,
             first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5, head_dim=16),
        Quant(sym=False)),
    "dots1-awq": (
        "Dots1Config", "Dots1ForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=2,
             first_k_dense_replace=1, head_dim=16),
        Quant(method="awq")),
    "minimax_m2-gptq": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                        dict(num_local_experts=8, num_experts_per_tok=3, head_dim=16), Quant(sym=False)),
    "olmoe-gptq-int8": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=3),
                        Quant(bits=8)),
    "deepseek_v3-awq": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1, q_lora_rank=16,
             **MLA),
        Quant(method="awq")),
}
PROJECTION = re.compile(r"(model\.layers\.\d+\.(?:mlp|block_sparse_moe)(?:\.experts\.\d+|\.shared_experts?)?)\."
                        r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
ROLE = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


def _shards(path):
    """{tensor name: shard file} of a directory save_pretrained wrote."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    return dict.fromkeys(load_file(str(path / "model.safetensors")), "model.safetensors")


def _save(path, tensors, shard_of, config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    for shard in sorted(set(shard_of.values())):
        save_file({n: t for n, t in tensors.items() if shard_of[n] == shard}, str(path / shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard_of}))


@pytest.mark.parametrize("case", MODELS)
def test_a_transformers_checkpoint_computes_what_transformers_computes(tmp_path, rng, case):
    config_class, model_class, kwargs, quant = MODELS[case]
    if case.startswith("deepseek_v3") and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 sums DeepSeek-V3's experts in float32, so it cannot be a float64 reference")
    torch.manual_seed(int(rng.integers(2 ** 31)))
    config = getattr(transformers, config_class)(**TINY, **kwargs)
    getattr(transformers, model_class)(config).to(torch.bfloat16).save_pretrained(tmp_path / "float",
                                                                                     max_shard_size="100KB")
    shard_of = _shards(tmp_path / "float")
    assert len(set(shard_of.values())) > 1, "the checkpoint should be sharded"
    tensors = {}
    for shard in set(shard_of.values()):
        tensors.update(load_file(str(tmp_path / "float" / shard)))
    for name in tensors:
        if name.endswith("e_score_correction_bias"):  # zeros from initialisation; make it choose
            tensors[name] = (rng.standard_normal(tensors[name].shape) * 0.01).astype(tensors[name].dtype)

    # Each MLP's gate, up and down become quantized tensors (gate and up share
    # g_idx, as act-order gives them); the float copy holds their exact values.
    modules: dict[str, dict[int, tuple[str, str]]] = {}
    for name in tensors:
        m = PROJECTION.match(name)
        if m:
            modules.setdefault(m.group(1), {})[ROLE[m.group(2)]] = (name, m.group(2))
    quantized = {n: t for n, t in tensors.items() if not PROJECTION.match(n)}
    quantized_shards = {n: shard_of[n] for n in quantized}
    dequantized = dict(tensors)
    for prefix, roles in modules.items():
        g_idx = None
        for role in range(3):
            name, projection = roles[role]
            n, k = tensors[name].shape  # a Linear's weight is [out, in]
            packed, dense, g = quantized_linear(rng, k, n, quant, g_idx if role == 1 else None)
            g_idx = g if role == 0 else g_idx
            for key, value in packed.items():
                quantized[f"{prefix}.{projection}.{key}"] = value
                quantized_shards[f"{prefix}.{projection}.{key}"] = shard_of[name]
            dequantized[name] = np.ascontiguousarray(dense.T, np.float32)  # exact: small integers times float16 scales
    saved_config = json.loads((tmp_path / "float" / "config.json").read_text())
    _save(tmp_path / "float64", dequantized, shard_of, saved_config)
    _save(tmp_path / "quantized", quantized, quantized_shards, {**saved_config, "quantization_config": quant.config()})

    # transformers 5 runs experts through grouped GEMMs that have no float64; its eager loop does.
    eager = {"experts_implementation": "eager"} if hasattr(transformers.PreTrainedModel,
                                                             "_can_set_experts_implementation") else {}
    reference = getattr(transformers, model_class).from_pretrained(tmp_path / "float64", dtype=torch.float64, **eager)
    layers = fm.load_moe_layers(tmp_path / "quantized", progress=False)
    assert list(layers) == list(range(getattr(config, "first_k_dense_replace", None) or 0, 3))
    for i, layer in layers.items():
        decoder_layer = reference.model.layers[i]
        block = getattr(decoder_layer, "block_sparse_moe", None) or decoder_layer.mlp
        x = random_activations(rng, (6, 64), "float16")
        with torch.no_grad():
            expected = block(torch.from_numpy(x.astype(np.float64))[None])
        expected = (expected[0] if isinstance(expected, tuple) else expected)[0].numpy()
        assert rel_error(layer.forward(x), expected) < REL_TOL["float16"], f"layer {i}"
