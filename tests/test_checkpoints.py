"""Published GPTQ/AWQ MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2/V3), written on the fly in their layouts by tests/model_dirs.py:
every layout loads with one call and matches float64 (routing and the whole
layer), and every broken directory is refused with the file and tensor named."""

import importlib
import json
import re
import shutil
import struct
import time

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe import checkpoint
from ferrum_moe.cli import main as cli

from conftest import REL_TOL, as64, random_activations, rel_error
from model_dirs import Quant, base_config, moe_layers, reference_forward, reference_route, write_model

CASES = {  # id: (model_type, quantization, config changes, shards, quantize_config.json beside config.json)
    "mixtral-gptq-v1-sym-int4": ("mixtral", Quant(), {}, 1, False),
    "mixtral-awq-sharded": ("mixtral", Quant(method="awq"), {}, 3, False),
    "qwen3-gptq-v2-asym-act-order-quantize_config": (
        "qwen3_moe", Quant(sym=False, act_order=True, checkpoint_format="gptq_v2", group_size=16), {}, 2, True),
    "qwen2-gptq-v1-asym-int8-per-column-shared-gate": (
        "qwen2_moe", Quant(bits=8, sym=False, group_size=-1), {"layers": 3, "mlp_only_layers": [0]}, 2, False),
    "qwen2-gptq-partial-words-sparse-step": (
        "qwen2_moe", Quant(group_size=16), {"layers": 4, "decoder_sparse_step": 2, "intermediate": 36}, 1, False),
    "deepseek_v2-gptq-int8-act-order-group-limited": (
        "deepseek_v2", Quant(bits=8, act_order=True), {"layers": 3, "n_shared_experts": 2}, 1, False),
    "deepseek_v2-greedy-renormalised-top3": (
        "deepseek_v2", Quant(sym=False), {"topk_method": "greedy", "norm_topk_prob": True, "top_k": 3}, 1, False),
    "deepseek_v3-awq-noaux-tc": ("deepseek_v3", Quant(method="awq"), {"layers": 3}, 2, False),
    "deepseek_v3-gptq-v2-int8-no-shared": (
        "deepseek_v3", Quant(bits=8, sym=False, checkpoint_format="gptq_v2"), {"n_shared_experts": 0}, 1, False),
    "minimax_m2-awq-block-level-bias": ("minimax_m2", Quant(method="awq"), {"top_k": 3}, 2, False),
    "kimi_k2-compressed-tensors-int4-group-32": (  # as Kimi-K2-Thinking ships: DeepSeek-V3's model, int4 experts
        "kimi_k2", Quant(method="compressed-tensors", group_size=32), {"layers": 3, "routed_scaling_factor": 2.827},
        2, False),
    "qwen3-compressed-tensors-w4a16": ("qwen3_moe", Quant(method="compressed-tensors"), {}, 2, False),
    "mixtral-compressed-tensors-w8a16-asym-act-order": (
        "mixtral", Quant(method="compressed-tensors", bits=8, sym=False, act_order=True), {}, 1, False),
    "deepseek_v3-compressed-tensors-per-channel-partial-words": (
        "deepseek_v3", Quant(method="compressed-tensors", group_size=-1, sym=False), {"intermediate": 36}, 1, False),
    "qwen3_next-gptq-shared-gate-default-renormalised": (
        "qwen3_next", Quant(sym=False), {"layers": 3, "mlp_only_layers": [1]}, 2, False),
    "glm4_moe-gptq-one-group-renormalised": ("glm4_moe", Quant(), {"layers": 3}, 2, False),
    "glm4_moe-awq-top1-grouped-defaults": (
        "glm4_moe", Quant(method="awq"), {"top_k": 1, "n_group": 4, "topk_group": 2, "norm_topk_prob": None,
                                          "routed_scaling_factor": None, "n_shared_experts": None}, 1, False),
    "dots1-gptq-act-order": ("dots1", Quant(act_order=True), {}, 1, False),
    "olmoe-gptq-int8-top8": ("olmoe", Quant(bits=8), {"top_k": 8, "experts": 16}, 1, False),
    "olmoe-awq-renormalised": ("olmoe", Quant(method="awq"), {"norm_topk_prob": True}, 1, False),
}


def _config(model_type, changes):
    sizes = {k: changes[k] for k in ("layers", "intermediate", "top_k") if k in changes}
    return base_config(model_type, **sizes, **{k: v for k, v in changes.items() if k not in sizes})


def _write(path, rng, case):
    model_type, quant, changes, shards, separate = CASES[case]
    config = _config(model_type, changes)
    return config, write_model(path, config, quant, rng, shards=shards, separate_quant_file=separate)


def _check_layer(config, ref, layer, rng, tokens=7):
    x = random_activations(rng, (tokens, config["hidden_size"]), "float16")
    x64 = x.astype(np.float64)
    weights, ids = layer.route(x)
    assert weights.dtype == np.float32 and ids.dtype == np.int32
    assert weights.shape == ids.shape == (tokens, config["num_experts_per_tok"])
    for t, expected in enumerate(reference_route(config, ref, x64)):
        got = sorted(zip(ids[t].tolist(), weights[t].tolist()))
        assert [e for e, _ in got] == sorted(e for e, _ in expected), f"token {t}"
        np.testing.assert_allclose([w for _, w in got], [w for _, w in sorted(expected)], rtol=1e-5)
    assert rel_error(layer.forward(x), reference_forward(config, ref, x64)) < REL_TOL["float16"]


@pytest.mark.parametrize("case", CASES)
def test_each_layout_loads_with_one_call_and_matches_float64(tmp_path, rng, case):
    config, refs = _write(tmp_path, rng, case)
    layers = fm.load_moe_layers(tmp_path, progress=False)
    assert list(layers) == moe_layers(config) == sorted(refs)
    for i, layer in layers.items():
        assert isinstance(layer, fm.MoE) and layer.top_k == config["num_experts_per_tok"]
        _check_layer(config, refs[i], layer, rng)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_layer_loads_in_other_activation_dtypes(tmp_path, rng, dtype):
    config, refs = _write(tmp_path, rng, "qwen2-gptq-v1-asym-int8-per-column-shared-gate")
    layer = fm.MoE.from_pretrained(tmp_path, 2, dtype=dtype, progress=False)
    assert layer.w13.dtype == dtype and layer.shared_expert.mlp.w13.dtype == dtype
    x = random_activations(rng, (5, 64), dtype)
    assert rel_error(layer.forward(x), reference_forward(config, refs[2], as64(x))) < REL_TOL[dtype]


def test_only_the_requested_layer_is_read(tmp_path, rng, monkeypatch):
    _write(tmp_path, rng, "deepseek_v2-gptq-int8-act-order-group-limited")
    read = []
    original = checkpoint.Checkpoint.read
    monkeypatch.setattr(checkpoint.Checkpoint, "read",
                        lambda self, info: read.append(info.name) or original(self, info))
    fm.MoE.from_pretrained(tmp_path, 2, progress=False)
    assert read and all(name.startswith("model.layers.2.mlp.") for name in read)
    assert any(".shared_experts." in name for name in read) and any(".experts.7." in name for name in read)


def test_torch_hidden_states_route_and_run_as_torch(tmp_path, rng):
    torch = pytest.importorskip("torch")
    config, refs = _write(tmp_path, rng, "deepseek_v3-awq-noaux-tc")
    layer = fm.MoE.from_pretrained(tmp_path, 1, progress=False)
    x = random_activations(rng, (6, 64), "float16")
    weights, ids = layer.route(torch.from_numpy(x))
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    y = layer.forward(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float16
    assert rel_error(y, reference_forward(config, refs[1], as64(x))) < REL_TOL["float16"]


def test_the_progress_bar_counts_experts_and_can_be_turned_off(tmp_path, rng, capsys):
    _write(tmp_path, rng, "qwen2-gptq-v1-asym-int8-per-column-shared-gate")
    fm.load_moe_layers(tmp_path, [1, 2])
    assert "18/18" in capsys.readouterr().err  # 2 layers x (8 experts + the shared one)
    fm.load_moe_layers(tmp_path, 1, progress=False)
    assert capsys.readouterr().err == ""


def test_layers_are_chosen_by_index(tmp_path, rng):
    _write(tmp_path, rng, "deepseek_v2-gptq-int8-act-order-group-limited")
    assert list(fm.load_moe_layers(tmp_path, np.int64(2), progress=False)) == [2]
    assert list(fm.load_moe_layers(tmp_path, [2, 1, 2], progress=False)) == [2, 1]
    with pytest.raises(ValueError, match=r"layer 0 is a dense MLP layer \(first_k_dense_replace 1, moe_layer_freq "
                                         r"1\); the MoE layers are 1-2"):
        fm.MoE.from_pretrained(tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match=r"layer 3 does not exist: .*config.json has num_hidden_layers 3"):
        fm.load_moe_layers(tmp_path, [1, 3], progress=False)
    with pytest.raises(TypeError, match="layer: expected an int; got '1'"):
        fm.load_moe_layers(tmp_path, ["1"], progress=False)


def test_route_needs_a_router_and_the_models_hidden_size(tmp_path, rng):
    _write(tmp_path, rng, "mixtral-gptq-v1-sym-int4")
    layer = fm.MoE.from_pretrained(tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match=r"route: hidden_states must be \[num_tokens, hidden=64\]; got shape "
                                         r"\[3, 32\]"):
        layer.route(np.zeros((3, 32), np.float16))
    plain = fm.MoE(layer.w13, layer.w2, top_k=2)
    with pytest.raises(ValueError, match="MoE.route: this layer has no router"):
        plain.forward(np.zeros((3, 64), np.float16))


def test_a_wrong_backend_device_or_dtype_is_refused_before_reading(tmp_path, rng, monkeypatch):
    _write(tmp_path, rng, "mixtral-gptq-v1-sym-int4")
    monkeypatch.setattr(checkpoint.Checkpoint, "read", lambda self, info: pytest.fail(f"read {info.name}"))
    with pytest.raises(fm.BackendUnavailableError, match="backend 'nosuch' is not selected"):
        fm.load_moe_layers(tmp_path, backend="nosuch")
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda', 'cuda:N' or a \(device_type, device_id\) tuple; got 'gpu'"):
        fm.load_moe_layers(tmp_path, device="gpu")
    with pytest.raises(ValueError, match="dtype: expected one of float32, float16, bfloat16; got 'float64'"):
        fm.load_moe_layers(tmp_path, dtype="float64")


# Broken directories. Each case edits a good checkpoint (qwen3_moe, 2 layers of
# 8 experts, GPTQ v1 4-bit group 32, two shards and an index, unless it says
# otherwise) and names what the message must say.

def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("q_"):
            config["quantization_config"][key[2:]] = value
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _shard_of(path, name):
    index = path / "model.safetensors.index.json"
    if index.exists():
        return path / json.loads(index.read_text())["weight_map"][name]
    return path / "model.safetensors"


def _rewrite(path, name, edit):
    """Rewrites the shard holding ``name``: edit(header dict, data bytes) -> (header, data)."""
    file = _shard_of(path, name)
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = edit(json.loads(raw[8:8 + n]), raw[8 + n:])
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return file


def _edit_tensors(path, edit):
    """Loads every tensor, lets edit(dict) change them, writes one file."""
    from safetensors.numpy import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
        f.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


EXPERT = "model.layers.1.mlp.experts.3"


def _drop(*names):
    return lambda t: [t.pop(n) for n in names]


def _set(name, value):
    return lambda t: t.__setitem__(name, value(t[name]))


def _shuffled_g_idx(t):
    for proj in ("gate_proj", "up_proj"):
        t[f"{EXPERT}.{proj}.g_idx"] = t[f"{EXPERT}.{proj}.g_idx"][::-1].copy()


def _float_expert(t):
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        t.pop(f"{EXPERT}.down_proj.{key}")
    t[f"{EXPERT}.down_proj.weight"] = np.zeros((64, 48), np.float16)


def _lying_shape(header, data):
    header[f"{EXPERT}.gate_proj.scales"]["shape"] = [4, 48]
    return header, data


def _past_the_end(header, data):
    entry = header[f"{EXPERT}.gate_proj.qweight"]
    entry["data_offsets"][1] += 10 ** 6
    entry["shape"][0] = (entry["data_offsets"][1] - entry["data_offsets"][0]) // (4 * entry["shape"][1])
    return header, data


def _overlapping(header, data):
    entry, other = header[f"{EXPERT}.gate_proj.scales"], header[f"{EXPERT}.gate_proj.qweight"]
    span = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [other["data_offsets"][0], other["data_offsets"][0] + span]
    return header, data


def _unknown_dtype(header, data):  # passes the header checks (a tensor never read); safetensors refuses the file
    header["model.norm.weight"]["dtype"] = "Q4_0"
    return header, data


def _gap(header, data):  # the last tensor moved 8 bytes on, the file 8 bytes longer
    last = max(header.values(), key=lambda e: e["data_offsets"][1] if isinstance(e, dict) and "data_offsets" in e
               else -1)
    last["data_offsets"] = [o + 8 for o in last["data_offsets"]]
    return header, data + bytes(8)


BROKEN = {  # id: (edit of the directory, what the message must say)
    "no config.json": (lambda p: (p / "config.json").unlink(),
                       r"config.json does not exist: is .* a model directory\?"),
    "config.json not JSON": (lambda p: (p / "config.json").write_text("{"),
                             r"config.json: the config.json is not valid JSON: Expecting"),
    "unknown model_type": (lambda p: _edit_config(p, model_type="llama"),
                           r"model_type 'llama' is not a MoE architecture ferrum-moe reads \(supported: mixtral"),
    "gelu experts": (lambda p: _edit_config(p, hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    "no quantization config": (lambda p: _edit_config(p, quantization_config=None),
                               r"config.json has no quantization_config and there is no quantize_config.json"),
    "fp8 checkpoint": (lambda p: _edit_config(p, q_quant_method="fp8"), r"quant_method 'fp8' is not supported"),
    "3-bit": (lambda p: _edit_config(p, q_bits=3), r"quantization_config in .*config.json: bits must be 4 or 8.*got 3"),
    "marlin format": (lambda p: _edit_config(p, q_checkpoint_format="marlin"), r"checkpoint_format 'marlin'"),
    "AWQ gemv": (lambda p: _edit_config(p, q_quant_method="awq", q_version="gemv"), r"AWQ version 'gemv'"),
    "group_size 0": (lambda p: _edit_config(p, q_group_size=0), r"group_size must be -1 or positive; got 0"),
    "group_size 2**63": (lambda p: _edit_config(p, q_group_size=2**63),
                         r"group_size must be at most 9223372036854775807 .*; got 9223372036854775808"),
    "more layers than tensors": (lambda p: _edit_config(p, num_hidden_layers=5),
                                 r"num_hidden_layers is 5, but only 2 of those layers have tensors; the first "
                                 r"missing is layer 2 \(no tensor model.layers.2.\*\)"),
    "absurd layer count": (lambda p: _edit_config(p, num_hidden_layers=10 ** 15),
                           r"num_hidden_layers is 1000000000000000, but only 2 of those layers have tensors"),
    "absurd expert count": (lambda p: _edit_config(p, num_experts=10 ** 15, num_experts_per_tok=2),
                            r"layer 0 is missing expert 8: .* says 1000000000000000 experts; 8 are present"),
    "no MoE layer": (lambda p: _edit_config(p, mlp_only_layers=[0, 1]),
                     r"config.json: none of the 2 layers is a MoE layer \(decoder_sparse_step 1, mlp_only_layers "
                     r"\[0, 1\]\)"),
    "top-k above experts": (lambda p: _edit_config(p, num_experts_per_tok=9),
                            r"num_experts_per_tok 9 exceeds the 8 experts"),
    "fewer experts in config": (lambda p: _edit_config(p, num_experts=4),
                                r"layer 0 has tensors of expert 4 \(model.layers.0.mlp.experts.4.gate_proj...\), "
                                r"but .*config.json says 4 experts"),
    "more experts in config": (lambda p: _edit_config(p, num_experts=10),
                               r"layer 0 is missing expert 8: no tensor model.layers.0.mlp.experts.8.gate_proj"),
    "wrong hidden size": (lambda p: _edit_config(p, hidden_size=32),
                          r"model.layers.0.mlp.gate.weight: expected shape \[8, 32\] \(\[num_experts, hidden\]\); "
                          r"got \[8, 64\]"),
    "model_type disagrees with the names": (
        lambda p: _edit_config(p, model_type="mixtral", num_local_experts=8, intermediate_size=48),
        r"model_type 'mixtral' \(Mixtral\) puts layer 0's router at model.layers.0.block_sparse_moe.gate.weight, "
        r"but no file .* holds it; its experts are named model.layers.0.mlp.experts.E.gate_proj/up_proj/down_proj"),
    "missing tensor": (lambda p: _edit_tensors(p, _drop(f"{EXPERT}.down_proj.scales")),
                       rf": missing tensor {EXPERT}.down_proj.scales \(in none of: model.safetensors\)"),
    "missing expert": (lambda p: _edit_tensors(p, lambda t: [t.pop(n) for n in list(t) if n.startswith(EXPERT)]),
                       r"layer 1 is missing expert 3: no tensor model.layers.1.mlp.experts.3.gate_proj.\* "
                       r"\(.* says 8 experts; 7 are present\)"),
    "scales as int32": (lambda p: _edit_tensors(p, _set(f"{EXPERT}.up_proj.scales", lambda a: a.astype(np.int32))),
                        rf"model.safetensors: tensor {EXPERT}.up_proj.scales: expected dtype F16 or BF16 or F32 "
                        r".*; got I32"),
    "qweight as float": (lambda p: _edit_tensors(p, _set(f"{EXPERT}.up_proj.qweight", lambda a: a.astype(np.float32))),
                         rf"tensor {EXPERT}.up_proj.qweight: expected dtype I32 .*; got F32"),
    "qweight one column short": (lambda p: _edit_tensors(p, _set(f"{EXPERT}.down_proj.qweight", lambda a: a[:, 1:])),
                                 rf"tensor {EXPERT}.down_proj.qweight: expected shape \[6, 64\] .*; got \[6, 63\]"),
    "8-bit config, 4-bit tensors": (
        lambda p: _edit_config(p, q_bits=8),
        r"tensor model.layers.0.mlp.experts.0.gate_proj.qweight: expected shape \[16, 48\] \(8-bit codes of K=64, 4 "
        r"per int32, as .* says bits 8\); got \[8, 48\]; that packs 4-bit codes"),
    "group size disagrees": (
        lambda p: _edit_config(p, q_group_size=16),
        r"gate_proj.scales: expected shape \[4, 48\] \(4 groups of group_size 16 over K=64, as .*\); got \[2, 48\], "
        r"2 groups: the group size disagrees"),
    "sym config, asym zeros": (
        lambda p: _edit_tensors(p, _set(f"{EXPERT}.gate_proj.qzeros", lambda a: a ^ np.int32(1))),
        rf"tensor {EXPERT}.gate_proj.qzeros: .* says sym true, but the zero points range over \[7, 8\]"),
    "rows out of group order without desc_act": (
        lambda p: _edit_tensors(p, _shuffled_g_idx),
        rf"tensor {EXPERT}.gate_proj.g_idx: rows are not in group order \(k // 32\), but .* says desc_act false"),
    "g_idx out of range": (
        lambda p: _edit_tensors(p, _set(f"{EXPERT}.up_proj.g_idx", lambda a: a + 5)),
        rf"tensor {EXPERT}.up_proj.g_idx: values must be group indices in \[0, 2\); got \[5, 6\]"),
    "unquantized expert": (lambda p: _edit_tensors(p, _float_expert),
                           rf"tensor {EXPERT}.down_proj.weight: the checkpoint keeps {EXPERT}.down_proj unquantized "
                           r"\(a float weight, F16 \[64, 48\], and no qweight\)"),
    "modules_to_not_convert covers experts": (
        lambda p: _edit_config(p, q_modules_to_not_convert=["mlp.gate", "experts"]),
        r"modules_to_not_convert entry 'experts' keeps model.layers.0.mlp.experts.0.gate_proj unquantized"),
    "nonzero expert bias": (lambda p: _edit_tensors(p, lambda t: t.__setitem__(f"{EXPERT}.down_proj.bias",
                                                                               np.ones(64, np.float16))),
                            rf"tensor {EXPERT}.down_proj.bias: a nonzero bias"),
    "desc_act without g_idx": (lambda p: (_edit_config(p, q_desc_act=True),
                                          _edit_tensors(p, _drop(f"{EXPERT}.gate_proj.g_idx"))),
                               rf"missing tensor {EXPERT}.gate_proj.g_idx"),
    "truncated shard": (lambda p: _shard_of(p, f"{EXPERT}.up_proj.qweight").write_bytes(
        _shard_of(p, f"{EXPERT}.up_proj.qweight").read_bytes()[:-100]),
                        r"model-0000\d-of-00002.safetensors: tensor .*: its data ends at byte \d+ of the data section, "
                        r"but the file holds only \d+ bytes of data: the file is truncated"),
    "header shape lies": (lambda p: _rewrite(p, f"{EXPERT}.gate_proj.scales", _lying_shape),
                          rf"tensor {EXPERT}.gate_proj.scales: shape \[4, 48\] of F16 needs 384 bytes, but its "
                          r"data_offsets \[\d+, \d+\] span 192"),
    "header offsets past the end": (lambda p: _rewrite(p, f"{EXPERT}.gate_proj.qweight", _past_the_end),
                                    rf"tensor {EXPERT}.gate_proj.qweight: its data ends at byte"),
    "overlapping tensors": (lambda p: _rewrite(p, f"{EXPERT}.gate_proj.scales", _overlapping),
                            r"tensor .* starts at byte \d+, inside tensor .* \(which ends at \d+\)"),
    "header length lies": (lambda p: _claim_header_bytes(_shard_of(p, "model.norm.weight"), 10 ** 7),
                           r"model-00002-of-00002.safetensors: the header claims 10000000 bytes but the file has \d+ "
                           r"after the length"),
    "header not JSON": (lambda p: _shard_of(p, "model.embed_tokens.weight").write_bytes(
        struct.pack("<Q", 4) + b"{{{{" + bytes(16)), r"model-00001-of-00002.safetensors: the safetensors header is "
                                                    r"not valid JSON"),
    "not a safetensors file": (lambda p: _shard_of(p, "model.embed_tokens.weight").write_bytes(b"abc"),
                               r"model-00001-of-00002.safetensors: 3 bytes, shorter than the 8-byte header length"),
    "gap in the data": (lambda p: _rewrite(p, "model.norm.weight", _gap),
                        r"model-00002-of-00002.safetensors: bytes \d+ to \d+ of the data section belong to no tensor "
                        r"\(a gap before tensor .*\): the header is wrong"),
    "a dtype safetensors does not know": (lambda p: _rewrite(p, "model.norm.weight", _unknown_dtype),
                                          r"model-00002-of-00002.safetensors: tensor .*: cannot be read: "
                                          r"SafetensorError"),
    "index names a missing shard": (lambda p: _shard_of(p, "model.norm.weight").unlink(),
                                    r"model.safetensors.index.json: names shard model-00002-of-00002.safetensors "
                                    r"\(\d+ tensors\), but .* does not exist"),
    "index points to the wrong shard": (
        lambda p: _edit_index(p, f"{EXPERT}.up_proj.scales"),
        rf"model.safetensors.index.json: maps tensor {EXPERT}.up_proj.scales to model-0000\d-of-00002.safetensors, "
        r"whose header has no such tensor"),
    "index escapes the directory": (lambda p: _edit_index(p, "model.norm.weight", "../elsewhere.safetensors"),
                                    r"shard '../elsewhere.safetensors' lies outside the model directory"),
    "a tensor in two files": (lambda p: (_edit_tensors(p, lambda t: None), shutil.copy(
        p / "model.safetensors", p / "copy.safetensors")), r"tensor .* is also in .*: which one is meant is ambiguous"),
    "no tensors": (lambda p: [f.unlink() for f in p.glob("*.safetensors*")], r"no .safetensors files"),
    # Found by fuzzing (tests/test_checkpoint_fuzz.py): each raised RecursionError, TypeError or a ValueError that
    # named no file, or loaded NaN.
    "header nested too deeply": (
        lambda p: _rewrite_text(p, "model.norm.weight", lambda t: b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b","
                                + t[1:]),
        r"model-00002-of-00002.safetensors: the safetensors header nests JSON arrays or objects too deeply to be read"),
    "a header number past int()'s digit limit": (
        lambda p: _rewrite_text(p, "model.norm.weight", lambda t: b'{"x":' + b"9" * 5000 + b"," + t[1:]),
        # (Python 3.11 words it "(4300 digits)", 3.10 "(4300) for integer string conversion")
        r"model-00002-of-00002.safetensors: the safetensors header is not valid JSON: Exceeds the limit \(4300"),
    "config.json nested too deeply": (lambda p: (p / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000),
                                      r"config.json: the config.json nests JSON arrays or objects too deeply"),
    "config.json not UTF-8": (
        lambda p: (p / "config.json").write_bytes((p / "config.json").read_bytes().replace(b'"silu"', b'"s\xffilu"')),
        r"config.json: the config.json is not UTF-8 text: 'utf-8' codec can't decode byte 0xff"),
    "dtype not a string": (lambda p: _rewrite(p, f"{EXPERT}.gate_proj.scales",
                                              _header_field(f"{EXPERT}.gate_proj.scales", "dtype", ["F16"])),
                           rf"model-0000\d-of-00002.safetensors: tensor {EXPERT}.gate_proj.scales: dtype must be a "
                           r"string such as \"F16\"; got \['F16'\]"),
    "a name of 5000 characters, cut in the message": (
        lambda p: _rewrite(p, "model.norm.weight", _header_field("model.layers." + "9" * 5000 + ".x", "dtype", 5)),
        r"model-00002-of-00002.safetensors: tensor model\.layers\.9{87}\.\.\.\(5015 characters\)\.\.\.9{48}\.x: "
        r"dtype must be a string such as \"F16\"; got 5$"),
    "__metadata__ not strings": (
        lambda p: _rewrite(p, "model.norm.weight", lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)),
        r"model-00002-of-00002.safetensors: the header's __metadata__ must map names to strings \(safetensors "
        r"refuses anything else\); got \{'format': 1\}"),
    "bytes appended": (lambda p: _append(_shard_of(p, "model.embed_tokens.weight"), bytes(8)),
                       r"model-00001-of-00002.safetensors: the data section holds \d+ bytes, but its tensors end at "
                       r"byte \d+: bytes were added to the file"),
    "a NaN scale": (lambda p: _edit_tensors(p, _set(f"{EXPERT}.up_proj.scales", _poison((1, 7), np.nan))),
                    rf"model.safetensors: tensor {EXPERT}.up_proj.scales: 1 of its values are NaN or infinite \(the "
                    r"first at \[1, 7\]\)"),
    "an infinite router weight": (
        lambda p: _edit_tensors(p, _set("model.layers.1.mlp.gate.weight", _poison((2, 5), np.inf))),
        r"model.safetensors: tensor model.layers.1.mlp.gate.weight: 1 of its values are NaN or infinite \(the first "
        r"at \[2, 5\]\)"),
    "model_type not a string": (lambda p: _edit_config(p, model_type=["qwen3_moe"]),
                                r"config.json: model_type \['qwen3_moe'\] is not a MoE architecture"),
    "bits as a string": (lambda p: _edit_config(p, q_bits="4"),
                         r"quantization_config in .*config.json: bits must be an integer; got '4'"),
    "mlp_only_layers 0": (lambda p: _edit_config(p, mlp_only_layers=0),
                          r"config.json: mlp_only_layers must be a list of layer indices; got 0"),
}


def _rewrite_text(path, name, edit):
    """Rewrites the header text of the shard holding ``name``: edit(bytes) -> bytes."""
    file = _shard_of(path, name)
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = edit(raw[8:8 + n])
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _header_field(name, field, value):
    """An edit for _rewrite: header entry ``name`` (a new, empty tensor if absent) gets ``field`` = ``value``."""
    def edit(header, data):
        header.setdefault(name, {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]})[field] = value
        return header, data
    return edit


def _append(file, data):
    file.write_bytes(file.read_bytes() + data)


def _poison(index, value):
    def poison(a):
        a = a.copy()
        a[index] = value
        return a
    return poison


def _claim_header_bytes(file, n):
    file.write_bytes(struct.pack("<Q", n) + file.read_bytes()[8:])


def _edit_index(path, name, shard=None):
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    files = sorted(set(data["weight_map"].values()))
    data["weight_map"][name] = shard or next(f for f in files if f != data["weight_map"][name])
    index.write_text(json.dumps(data))


@pytest.fixture
def good(tmp_path, rng):
    write_model(tmp_path, base_config("qwen3_moe"), Quant(), rng, shards=2)
    return tmp_path


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_checkpoint_is_refused_with_the_file_and_tensor_named(good, case):
    edit, message = BROKEN[case]
    edit(good)
    with pytest.raises(fm.CheckpointError) as info:
        fm.load_moe_layers(good, progress=False)
    assert re.search(message, str(info.value)), str(info.value)


def test_an_8_bit_v1_zero_point_of_256_is_refused_with_its_tensor(tmp_path, rng):
    write_model(tmp_path, base_config("qwen3_moe"), Quant(bits=8, sym=False), rng)
    # Byte 1 of word 1 of group 0: column 5's stored zero - 1, 0xFF.
    _edit_tensors(tmp_path, _set(f"{EXPERT}.up_proj.qzeros", lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 1, a | np.int32(0xFF << 8), a)))
    with pytest.raises(fm.CheckpointError, match=rf"model.safetensors: tensor {EXPERT}.up_proj.qzeros: the stored "
                                                 r"8-bit v1 zero point of group 0, column 5 is 0xFF, which means a zero "
                                                 r"point of 256"):
        fm.load_moe_layers(tmp_path, progress=False)


def test_scales_past_float16s_range_are_refused_for_float16_only(tmp_path, rng):
    """float32 scales of 1e5 would be infinite as float16 activations; bfloat16 and float32 hold them."""
    write_model(tmp_path, base_config("qwen3_moe"), Quant(), rng)
    _edit_tensors(tmp_path, _set(f"{EXPERT}.down_proj.scales", lambda a: _poison((1, 2), 1e5)(a.astype(np.float32))))
    with pytest.raises(fm.CheckpointError, match=rf"model.safetensors: tensor {EXPERT}.down_proj.scales: 1 of its "
                                                 r"values exceed float16's range \(65504\) \(the first at \[1, 2\]\): "
                                                 r"load the layers with dtype='bfloat16' or 'float32'"):
        fm.load_moe_layers(tmp_path, progress=False)
    assert list(fm.load_moe_layers(tmp_path, dtype="float32", progress=False)) == [0, 1]


def test_names_that_are_not_layer_or_expert_indices_are_ignored(tmp_path, rng):
    """Only indices as module names write them count (no leading zeros, ASCII
    digits, at most 18): a 5000-digit one went past int()'s digit limit."""
    config, refs = _write(tmp_path, rng, "mixtral-gptq-v1-sym-int4")
    odd = ["model.layers." + "9" * 5000 + ".input_layernorm.weight", "model.layers.01.input_layernorm.weight",
           "model.layers.\u0661.input_layernorm.weight", "model.layers.0.block_sparse_moe.experts.08.w1.qweight"]
    _edit_tensors(tmp_path, lambda t: t.update(dict.fromkeys(odd, np.ones(4, np.float16))))
    layers = fm.load_moe_layers(tmp_path, progress=False)
    assert list(layers) == [0, 1]
    for i, layer in layers.items():
        _check_layer(config, refs[i], layer, rng)


def test_a_shape_of_200000_huge_dimensions_is_refused_at_once(good):
    """Multiplying out 200,000 dimensions of 2^64 took about two minutes (time
    quadratic in the digits); the size stops at the first factor past 2^64."""
    _rewrite(good, "model.norm.weight", _header_field("model.norm.weight", "shape", [2**64] * 200_000))
    start = time.perf_counter()
    with pytest.raises(fm.CheckpointError, match=r"model-00002-of-00002.safetensors: tensor model.norm.weight: shape "
                                                 r"\[18446744073709551616, .*\] of F16 needs more than 2\^64 bytes"):
        fm.load_moe_layers(good, progress=False)
    assert time.perf_counter() - start < 10


def test_act_order_gate_and_up_must_share_g_idx(tmp_path, rng):
    write_model(tmp_path, base_config("qwen3_moe"), Quant(act_order=True), rng)
    _edit_tensors(tmp_path, _set(f"{EXPERT}.up_proj.g_idx", lambda a: np.roll(a, 1)))
    with pytest.raises(fm.CheckpointError, match=rf"model.safetensors: tensor {EXPERT}.gate_proj.g_idx and .*"
                                                 rf"model.safetensors: tensor {EXPERT}.up_proj.g_idx: gate and up have "
                                                 r"different g_idx \(act-order\)"):
        fm.load_moe_layers(tmp_path, progress=False)


def test_awq_needs_n_in_whole_words(tmp_path, rng):
    write_model(tmp_path, base_config("mixtral"), Quant(method="awq"), rng)
    _edit_config(tmp_path, intermediate_size=44)
    with pytest.raises(fm.CheckpointError, match=r"config.json: N=44 of model.layers.0.block_sparse_moe.experts.0.w1 "
                                                 r"\(from its sizes\) is not a multiple of 8"):
        fm.load_moe_layers(tmp_path, progress=False)


def test_a_header_bigger_than_the_file_is_refused_before_reading_it(tmp_path):
    file = tmp_path / "x.safetensors"
    file.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")
    with pytest.raises(fm.CheckpointError, match=r"x.safetensors: the header claims 1152921504606846976 bytes but "
                                                 r"the file has 2 after the length"):
        checkpoint.read_header(file)


# A backend that cannot run the checkpoint: the example plugin computes in
# float32 only and has no routing.
from test_plugin_example import built_example, registered  # noqa: E402, F401  (fixtures)


def test_a_backend_that_cannot_run_the_format_says_why(registered, tmp_path, rng):  # noqa: F811
    write_model(tmp_path, base_config("mixtral"), Quant(), rng)
    with pytest.raises(NotImplementedError, match=r"layer 0: experts' w13 \[gate \| up\] \(8 x \[K=64, N=96\], "
                                                  r"4-bit, group_size 32, float16\): backend 'minimal' cannot run it: "
                                                  r".*computes in float32 only"):
        fm.load_moe_layers(tmp_path, backend="minimal", progress=False)


def test_inspect_says_which_backends_can_run_it(registered, tmp_path, rng, capsys):  # noqa: F811
    write_model(tmp_path, base_config("mixtral"), Quant(), rng)
    assert cli(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"cpu +can run it on cpu", out)
    assert re.search(r"minimal +cannot run it: NotImplementedError: .*computes in float32 only", out)
    assert cli(["inspect", str(tmp_path), "--dtype", "float32"]) == 0
    assert re.search(r"minimal +cannot run it: NotImplementedError: .*has no routing", capsys.readouterr().out)


# The command line.

def test_inspect_prints_the_layout_quantization_and_bytes(tmp_path, rng, capsys):
    config = base_config("qwen2_moe", layers=3, mlp_only_layers=[0])
    write_model(tmp_path, config, Quant(bits=8, sym=False), rng, shards=2)
    assert cli(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("architecture: Qwen2-MoE (model_type qwen2_moe)",
                 "layers: 3; MoE: 1-2; dense: 0 (decoder_sparse_step 1, mlp_only_layers [0])",
                 "experts: 8 per MoE layer, top-2; hidden 64, expert intermediate 48",
                 "shared experts: one MLP (shared_expert), intermediate 80, scaled by sigmoid(shared_expert_gate)",
                 "quantization of the experts: GPTQ 8-bit, group 32, asym (zero points), desc_act false, "
                 "checkpoint_format gptq",
                 "files: 2 .safetensors, index model.safetensors.index.json"):
        assert line in out, out
    from safetensors.numpy import load_file

    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    layer_bytes = sum(a.nbytes for n, a in tensors.items() if n.startswith("model.layers.1.mlp."))
    total = sum(a.nbytes for a in tensors.values())
    assert f"bytes per MoE layer (experts, router, shared experts): {layer_bytes / 1e3:.2f} kB (layer 1-2)" in out
    assert f"the whole checkpoint {total / 1e3:.2f} kB" in out


@pytest.mark.parametrize("case", ["qwen2-gptq-v1-asym-int8-per-column-shared-gate", "deepseek_v3-awq-noaux-tc"])
def test_run_checks_a_layer_against_float64(tmp_path, rng, capsys, case):
    _write(tmp_path, rng, case)
    assert cli(["run", str(tmp_path), "--layer", "2", "--tokens", "5", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"relative error vs float64 reference: \S+ \(tolerance 5e-03\)", out)
    assert re.search(r"tokens/s; \d+ active experts, \S+ GB/s of quantized weights\nOK", out)


def test_the_cli_refuses_a_broken_checkpoint_with_its_message(good, capsys):
    _edit_tensors(good, _drop(f"{EXPERT}.down_proj.scales"))
    assert cli(["run", str(good)]) == 0  # layer 0 is whole: run reads only its own layer
    capsys.readouterr()
    assert cli(["run", str(good), "--layer", "1"]) == 2
    assert f"ferrum-moe run: {good}: missing tensor {EXPERT}.down_proj.scales (in none of: model.safetensors)" \
        in capsys.readouterr().err
    assert cli(["inspect", str(good)]) == 2
    assert f"missing tensor {EXPERT}.down_proj.scales" in capsys.readouterr().err
    assert cli(["run", str(good), "--layer", "7"]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [8, 16, 1024])
def test_runs_reference_dequantizes_block_by_block_exactly(rng, columns):
    from ferrum_moe.cli import _times_dequantized
    from ferrum_moe.testing import random_weight

    w = random_weight(rng, 64, 36, bits=4, group_size=16, sym=False, act_order=True)  # 36: a partial zero word
    x64 = rng.standard_normal((3, 64))
    np.testing.assert_allclose(_times_dequantized(x64, w, columns), x64 @ w.dequantize(np.float64), rtol=1e-12)


def _compressed_tensors_packer():
    """compressed-tensors' own pack_to_int32 (its module moved between versions)."""
    pytest.importorskip("torch")
    for where in ("compressed_tensors.compressors.pack_quantized.helpers",
                  "compressed_tensors.compressors.quantized_compressors.pack_quantized"):
        try:
            return importlib.import_module(where).pack_to_int32
        except (ImportError, AttributeError):
            continue
    pytest.skip("compressed-tensors is not installed (pip install compressed-tensors)")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym, group", [(False, 12), (True, 12), (False, -1)])
def test_compressed_tensors_own_packing_reads_as_its_values(rng, bits, sym, group):
    """The reader against the format's own writer: signed values (and zero
    points) packed by compressed-tensors come out as (q - zero) * scale."""
    pack_to_int32 = _compressed_tensors_packer()  # skips without it (and torch)
    import torch

    from ferrum_moe.pretrained import QuantizedModule, _from_compressed_tensors

    n, k = 20, 84  # words that end part-filled along both packed axes
    groups = 1 if group == -1 else k // group
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    q = rng.integers(low, high, (n, k)).astype(np.int8)
    zp = np.zeros((n, groups), np.int8) if sym else rng.integers(low, high, (n, groups)).astype(np.int8)
    scale = (rng.random((n, groups)) + 0.5).astype(np.float16)
    # Under the roles quantized_module gives them (weight_packed as qweight, ...).
    tensors = {"qweight": pack_to_int32(torch.from_numpy(q), bits).numpy(), "scales": scale,
               "shape": np.array([n, k])}
    if not sym:
        tensors["qzeros"] = pack_to_int32(torch.from_numpy(zp), bits, packed_dim=0).numpy()
    a = _from_compressed_tensors(QuantizedModule("m", k, n, {}, None), tensors, bits)
    w = fm.GPTQWeight(a["qweight"], a["scales"], a.get("qzeros"), bits=bits, group_size=group, sym=sym,
                      checkpoint_format="gptq_v2", k=k)
    g = np.zeros(k, int) if group == -1 else np.arange(k) // group
    expected = ((q.astype(np.float64) - zp[:, g]) * scale.astype(np.float64)[:, g]).T
    np.testing.assert_array_equal(w.dequantize(np.float64), expected)


@pytest.fixture
def compressed(tmp_path, rng):
    """A qwen3_moe W4A16 checkpoint as llm-compressor writes it (pack-quantized, group 32)."""
    write_model(tmp_path, base_config("qwen3_moe"), Quant(method="compressed-tensors"), rng)
    return tmp_path


def _edit_scheme(path, **changes):
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    for key, value in changes.items():
        if key == "group":
            q["config_groups"]["group_1"] = value
        elif key in ("format", "ignore"):
            q[key] = value
        elif key in ("input_activations", "targets"):
            q["config_groups"]["group_0"][key] = value
        else:
            q["config_groups"]["group_0"]["weights"][key] = value
    (path / "config.json").write_text(json.dumps(config))


COMPRESSED_BROKEN = {
    "other format": (dict(format="marlin-24"), r"compressed-tensors format 'marlin-24' is not supported"),
    "activations quantized": (dict(input_activations={"num_bits": 8, "type": "int"}),
                              r"config_groups.group_0 \(which targets model.layers.0.mlp.experts.0.gate_proj\) "
                              r"quantizes activations too; ferrum-moe runs weight-only"),
    "fp8 weights": (dict(type="float", num_bits=8), r"group_0 .*\.weights: 'float' with num_bits 8 is not supported"),
    "tensor strategy": (dict(strategy="tensor"), r"strategy 'tensor' is not supported"),
    "bad group size": (dict(group_size=0), r"group_size must be a positive integer for strategy 'group'; got 0"),
    "unknown actorder": (dict(actorder="sideways"), r"actorder 'sideways' is not supported"),
    "two schemes for the experts": (dict(group={"targets": ["re:.*experts.*"], "weights": {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}),
        r"config groups with different weight schemes all target model.layers.0.mlp.experts.0.gate_proj \(group_0: "
        r"int4, group 32, sym, act-order false; group_1: int8, group -1, sym, act-order false\)"),
    "experts ignored": (dict(ignore=["lm_head", "re:.*experts.*"]),
                        r"ignore entry 're:.\*experts.\*' keeps model.layers.0.mlp.experts.0.gate_proj unquantized"),
    "a broken pattern": (dict(ignore=["re:(mlp"]), r"ignore: entry 're:\(mlp' is not a regular expression"),
    "no group for the experts": (dict(targets=["re:.*self_attn.*"]),
                                 r"no config_groups target matches model.layers.0.mlp.experts.0.gate_proj"),
}


@pytest.mark.parametrize("case", COMPRESSED_BROKEN)
def test_a_compressed_tensors_checkpoint_outside_its_scheme_is_refused(compressed, case):
    changes, message = COMPRESSED_BROKEN[case]
    _edit_scheme(compressed, **changes)
    with pytest.raises(fm.CheckpointError, match=message):
        fm.load_moe_layers(compressed, progress=False)


def test_a_compressed_tensors_weight_shape_that_disagrees_is_named(compressed):
    _edit_tensors(compressed, _set(f"{EXPERT}.down_proj.weight_shape", lambda a: a[::-1].copy()))
    with pytest.raises(fm.CheckpointError, match=rf"tensor {EXPERT}.down_proj.weight_shape: holds \[48, 64\]; the "
                                                 rf"layer's sizes make {EXPERT}.down_proj \[N, K\] = \[64, 48\]"):
        fm.load_moe_layers(compressed, progress=False)


def test_attention_quantized_otherwise_does_not_stop_the_experts(tmp_path, rng):
    """A mixed-precision config (FP8 attention with its activations, int4
    experts): each module takes its own group's scheme, and the experts load."""
    config = base_config("qwen3_moe")
    refs = write_model(tmp_path, config, Quant(method="compressed-tensors", act_order=True), rng)
    edited = json.loads((tmp_path / "config.json").read_text())
    q = edited["quantization_config"]
    q["format"] = "mixed-precision"
    q["config_groups"]["group_0"]["targets"] = ["re:.*mlp\\.experts.*"]
    q["config_groups"]["group_0"]["weights"]["actorder"] = "dynamic"  # compressed-tensors' alias of "group"
    q["config_groups"]["group_1"] = {"targets": ["re:.*self_attn.*"], "format": "float-quantized",
                                     "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                     "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}
    (tmp_path / "config.json").write_text(json.dumps(edited))
    layers = fm.load_moe_layers(tmp_path, progress=False)
    for i, layer in layers.items():
        _check_layer(config, refs[i], layer, rng)


def test_a_g_idx_left_unset_reads_as_rows_in_order(tmp_path, rng):
    """llm-compressor starts g_idx at -1 and an expert no calibration token
    reached may keep it: compressed-tensors then takes the rows in order."""
    config = base_config("qwen3_moe")
    refs = write_model(tmp_path, config, Quant(method="compressed-tensors"), rng)
    _edit_tensors(tmp_path, lambda t: t.__setitem__(f"{EXPERT}.gate_proj.weight_g_idx", np.full(64, -1, np.int32)))
    layers = fm.load_moe_layers(tmp_path, progress=False)
    _check_layer(config, refs[1], layers[1], rng)
