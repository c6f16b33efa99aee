"""The MoE architectures ferrum-moe reads, recognised by config.json's
model_type: where each layer's experts, router and shared experts live in the
checkpoint, which layers are MoE, and the router's rule.

Structural numbers (layers, hidden size, experts, top-k, intermediate sizes)
must be in config.json; behaviour keys a config may leave out take the defaults
of the model's transformers configuration class (norm_topk_prob,
routed_scaling_factor, topk_method, ...)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

from .checkpoint import CheckpointError, quote
from .router import RoutingRule


@dataclasses.dataclass(frozen=True)
class Layout:
    """Tensor names of one architecture under ``model.layers.{i}.{block}``."""

    title: str
    block: str
    projections: tuple[str, str, str]  # gate, up, down
    shared: str | None = None  # the shared expert MLP's module, if the model has one
    shared_gate: str | None = None  # a float [1, hidden] Linear whose sigmoid scales the shared expert
    bias: str = "gate.e_score_correction_bias"  # the noaux_tc routers' correction bias, under the block


_PROJ = ("gate_proj", "up_proj", "down_proj")
LAYOUTS = {
    "mixtral": Layout("Mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    "minimax_m2": Layout("MiniMax-M2", "block_sparse_moe", ("w1", "w3", "w2"), bias="e_score_correction_bias"),
    "qwen2_moe": Layout("Qwen2-MoE", "mlp", _PROJ, "shared_expert", "shared_expert_gate"),
    "qwen3_moe": Layout("Qwen3-MoE", "mlp", _PROJ),
    "qwen3_next": Layout("Qwen3-Next", "mlp", _PROJ, "shared_expert", "shared_expert_gate"),
    "deepseek_v2": Layout("DeepSeek-V2", "mlp", _PROJ, "shared_experts"),
    "deepseek_v3": Layout("DeepSeek-V3", "mlp", _PROJ, "shared_experts"),
    "kimi_k2": Layout("Kimi-K2", "mlp", _PROJ, "shared_experts"),  # DeepSeek-V3's model, named apart
    "glm4_moe": Layout("GLM-4.5", "mlp", _PROJ, "shared_experts"),
    "dots1": Layout("dots.llm1", "mlp", _PROJ, "shared_experts"),
    "olmoe": Layout("OLMoE", "mlp", _PROJ),
}
# The architectures that route as DeepSeek-V3 does (sigmoid scores, noaux_tc),
# with their own defaults: {model_type: (norm_topk_prob, routed_scaling_factor,
# first_k_dense_replace)}. GLM-4.5 and dots.llm1 renormalise at any top-k.
_V3_ROUTING = {"deepseek_v3": (True, 2.5, 0), "kimi_k2": (True, 2.5, 0), "glm4_moe": (True, 1.0, 1),
               "dots1": (False, 1.0, 0)}
_DEEPSEEK = ("deepseek_v2", "deepseek_v3", "kimi_k2")  # DeepSeek's own modeling code and its rules
ROLES = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What config.json says about a MoE model, checked for consistency."""

    model_type: str
    layout: Layout
    num_layers: int
    hidden: int
    num_experts: int
    intermediate: int  # of one routed expert
    shared_intermediate: int  # of the shared expert MLP; 0 when the model has none
    moe_layers: tuple[int, ...]
    dense_rule: str  # the config keys that make the other layers dense
    routing: RoutingRule
    source: str  # config.json's path, for messages

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def block(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.layout.block}"

    def expert(self, layer: int, expert: int, role: str) -> str:
        return f"{self.block(layer)}.experts.{expert}.{self.layout.projections[ROLES.index(role)]}"

    def shared(self, layer: int, role: str) -> str:
        return f"{self.block(layer)}.{self.layout.shared}.{self.layout.projections[ROLES.index(role)]}"

    def router_weight(self, layer: int) -> str:
        return f"{self.block(layer)}.gate.weight"

    def correction_bias(self, layer: int) -> str:
        return f"{self.block(layer)}.{self.layout.bias}"

    def shared_gate_weight(self, layer: int) -> str:
        return f"{self.block(layer)}.{self.layout.shared_gate}.weight"

    def check_layer(self, layer) -> int:
        """``layer`` as an int, if it is one of the model's MoE layers."""
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer: expected an int; got {layer!r}")
        layer = int(layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} does not exist: {self.source} has num_hidden_layers {self.num_layers}")
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is a dense MLP layer ({self.dense_rule}); the MoE layers are "
                             f"{ranges(self.moe_layers)}")
        return layer


def ranges(values) -> str:
    """'0-3, 5, 7-9' for [0, 1, 2, 3, 5, 7, 8, 9]."""
    values = sorted(set(values))
    if not values:
        return "none"
    runs = []
    start = prev = values[0]
    for value in values[1:] + [None]:
        if value is None or value != prev + 1:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = value
        prev = value
    return ", ".join(runs)


class _Config:
    """Typed reads of config.json's keys, with the file named in every error."""

    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source

    def _get(self, keys):
        for key in keys:
            if self.config.get(key) is not None:
                return key, self.config[key]
        return keys[0], None

    def int(self, *keys, default=None, minimum=1) -> int:
        key, value = self._get(keys)
        if value is None:
            if default is None:
                raise CheckpointError(f"{self.source}: {key} is missing")
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise CheckpointError(f"{self.source}: {key} must be an integer >= {minimum}; got {quote(value)}")
        return value

    def float(self, key, default) -> float:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{self.source}: {key} must be a positive number; got {quote(value)}")
        return float(value)

    def bool(self, key, default) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise CheckpointError(f"{self.source}: {key} must be true or false; got {quote(value)}")
        return value

    def choice(self, key, default, allowed) -> str:
        value = self.config.get(key)
        if value is None:
            return default
        if value not in allowed:
            raise CheckpointError(f"{self.source}: {key} {quote(value)} is not supported (supported: "
                                  f"{', '.join(allowed)})")
        return value

    def int_list(self, key) -> list[int]:
        value = self.config.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise CheckpointError(f"{self.source}: {key} must be a list of layer indices; got {quote(value)}")
        return value


def _group_limits(c: _Config, num_experts: int, top_k: int, default=None) -> tuple[int, int]:
    n_group = c.int("n_group", default=default)
    topk_group = c.int("topk_group", default=default)
    if num_experts % n_group:
        raise CheckpointError(f"{c.source}: n_group {n_group} does not divide the {num_experts} experts")
    if topk_group > n_group or top_k > topk_group * (num_experts // n_group):
        raise CheckpointError(f"{c.source}: top-{top_k} from topk_group {topk_group} of n_group {n_group} groups of "
                              f"{num_experts // n_group} experts is impossible")
    return n_group, topk_group


def parse(config: dict, source: str, layers_present) -> ModelSpec:
    """The ModelSpec of config.json ``config``; ``layers_present`` is the set of
    layer indices that have tensors (config numbers are checked against it)."""
    c = _Config(config, source)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in LAYOUTS:
        raise CheckpointError(f"{source}: model_type {quote(model_type)} is not a MoE architecture ferrum-moe reads "
                              f"(supported: {', '.join(LAYOUTS)})")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {quote(act)} is not supported: ferrum-moe's experts compute "
                              "silu(gate) * up")
    num_layers = c.int("num_hidden_layers")
    present = {i for i in layers_present if i < num_layers}
    if len(present) < num_layers:  # never materialise range(num_layers) before it is known to be real
        first = next(i for i in range(num_layers) if i not in present)
        raise CheckpointError(f"{source}: num_hidden_layers is {num_layers}, but only {len(present)} of those layers "
                              f"have tensors; the first missing is layer {first} (no tensor model.layers.{first}.*)")
    hidden = c.int("hidden_size")
    top_k = c.int("num_experts_per_tok")
    shared_intermediate = 0
    if model_type == "mixtral":
        num_experts = c.int("num_local_experts", "num_experts")
        intermediate = c.int("intermediate_size")
        moe_layers, dense_rule = list(range(num_layers)), "every Mixtral layer is MoE"
        rule = RoutingRule("softmax", "greedy", top_k, renormalize=True)
    elif model_type == "minimax_m2":
        # Sigmoid scores; the top-k of score + bias, all experts competing; weights renormalised.
        num_experts = c.int("num_local_experts", "num_experts")
        intermediate = c.int("intermediate_size")
        moe_layers, dense_rule = list(range(num_layers)), "every MiniMax-M2 layer is MoE"
        rule = RoutingRule("sigmoid", "noaux_tc", top_k, renormalize=True)
    elif model_type == "olmoe":
        num_experts = c.int("num_experts")
        intermediate = c.int("intermediate_size")
        moe_layers, dense_rule = list(range(num_layers)), "every OLMoE layer is MoE"
        rule = RoutingRule("softmax", "greedy", top_k, renormalize=c.bool("norm_topk_prob", False))
    elif model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        num_experts = c.int("num_experts", "num_local_experts")
        intermediate = c.int("moe_intermediate_size")
        step = c.int("decoder_sparse_step", default=1)
        mlp_only = c.int_list("mlp_only_layers")
        dense = set(mlp_only)
        moe_layers = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
        dense_rule = f"decoder_sparse_step {step}, mlp_only_layers {mlp_only}"
        rule = RoutingRule("softmax", "greedy", top_k,
                           renormalize=c.bool("norm_topk_prob", model_type == "qwen3_next"))
        if model_type != "qwen3_moe":
            shared_intermediate = c.int("shared_expert_intermediate_size")
    else:
        num_experts = c.int("n_routed_experts", "num_experts", "num_local_experts")
        intermediate = c.int("moe_intermediate_size")
        v3 = model_type in _V3_ROUTING
        norm_default, factor_default, first_dense_default = _V3_ROUTING.get(model_type, (False, 1.0, 0))
        first_dense = c.int("first_k_dense_replace", default=first_dense_default, minimum=0)
        freq = c.int("moe_layer_freq", default=1)
        moe_layers = [i for i in range(first_dense, num_layers) if i % freq == 0]
        dense_rule = f"first_k_dense_replace {first_dense}, moe_layer_freq {freq}"
        shared_intermediate = intermediate * c.int("n_shared_experts", default=1 if model_type == "glm4_moe" else 0,
                                                   minimum=0)
        c.choice("scoring_func", "sigmoid" if v3 else "softmax", ["sigmoid"] if v3 else ["softmax"])
        method = c.choice("topk_method", "noaux_tc" if v3 else "greedy",
                          ["noaux_tc"] if v3 else ["greedy", "group_limited_greedy"])
        # DeepSeek's own code: renormalise only for top_k > 1; V2 scales only weights it does not renormalise.
        renormalize = c.bool("norm_topk_prob", norm_default) and (top_k > 1 or model_type not in _DEEPSEEK)
        factor = c.float("routed_scaling_factor", factor_default)
        scaling = factor if v3 or not renormalize else 1.0
        if method == "greedy":
            n_group, topk_group = 1, 1
        elif model_type in _DEEPSEEK:
            n_group, topk_group = _group_limits(c, num_experts, top_k)
        else:  # GLM-4.5 and dots.llm1 default to one group
            n_group, topk_group = _group_limits(c, num_experts, top_k, default=1)
        rule = RoutingRule("sigmoid" if v3 else "softmax", method, top_k, renormalize, scaling, n_group, topk_group)
    if top_k > num_experts:
        raise CheckpointError(f"{source}: num_experts_per_tok {top_k} exceeds the {num_experts} experts")
    if not moe_layers:
        raise CheckpointError(f"{source}: none of the {num_layers} layers is a MoE layer ({dense_rule})")
    return ModelSpec(model_type, LAYOUTS[model_type], num_layers, hidden, num_experts, intermediate,
                     shared_intermediate, tuple(moe_layers), dense_rule, rule, source)


# An index as module names write it (str of an int: no leading zeros, ASCII
# digits); the 18-digit cap keeps int() far from its digit limit on names a file
# makes up. Other spellings are not layer or expert names: the loader never
# looks tensors up by them.
_INDEX = r"(0|[1-9][0-9]{0,17})"


def layer_indices(names) -> set[int]:
    """The layer indices N of tensors named model.layers.N.*."""
    pattern = re.compile(rf"model\.layers\.{_INDEX}\.")
    return {int(m.group(1)) for m in map(pattern.match, names) if m}


def expert_indices(names, spec: ModelSpec) -> dict[int, set[int]]:
    """For each layer, the expert indices E of tensors named {block}.experts.E.*."""
    pattern = re.compile(rf"model\.layers\.{_INDEX}\.{re.escape(spec.layout.block)}\.experts\.{_INDEX}\.")
    found: dict[int, set[int]] = {}
    for m in map(pattern.match, names):
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return found


def naming_found(names, layer: int) -> str | None:
    """How ``layer``'s expert tensors are named when they follow one of the known
    layouts (to say what the tensors look like when model_type disagrees)."""
    for layout in LAYOUTS.values():
        prefix = f"model.layers.{layer}.{layout.block}.experts.0.{layout.projections[0]}."
        if any(n.startswith(prefix) for n in names):
            return f"model.layers.{layer}.{layout.block}.experts.E.{'/'.join(layout.projections)}"
    return None
