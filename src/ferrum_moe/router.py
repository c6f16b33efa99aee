"""A MoE layer's router as its model defines it: logits = x @ gate.T in float32
on the host (the gate is [num_experts, hidden], a small GEMM), then the model's
rule for scores, expert choice and top-k weights."""

from __future__ import annotations

import dataclasses

import numpy as np

SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclasses.dataclass(frozen=True)
class RoutingRule:
    """scoring: softmax or sigmoid over the logits. topk_method: "greedy" (the
    top_k scores), "group_limited_greedy" (DeepSeek-V2: experts in n_group
    groups, only the topk_group groups with the highest best score compete) or
    "noaux_tc" (DeepSeek-V3: scores + correction bias choose, groups ranked by
    the sum of their two best). The weights are the chosen experts' scores
    (never the bias), divided by their sum when ``renormalize``, then times
    ``scaling``."""

    scoring: str
    topk_method: str
    top_k: int
    renormalize: bool
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def describe(self) -> str:
        text = f"{self.scoring} scores, top-{self.top_k}"
        if self.topk_method == "group_limited_greedy":
            text += f" from the best {self.topk_group} of {self.n_group} groups (group score: its best expert)"
        elif self.topk_method == "noaux_tc":
            text += (f" by score + e_score_correction_bias, from the best {self.topk_group} of {self.n_group} groups "
                     "(group score: its two best)")
        text += ", weights renormalised to sum 1" if self.renormalize else ", weights are the chosen scores"
        if self.scaling != 1.0:
            text += f", times routed_scaling_factor {self.scaling:g}"
        return text


def select_experts(logits: np.ndarray, rule: RoutingRule, correction_bias: np.ndarray | None = None):
    """(topk_weights float32 [T, top_k], topk_ids int32 [T, top_k]) from router
    logits [T, num_experts], by ``rule``; ids ordered by falling choice score."""
    logits = np.asarray(logits, np.float32)
    if rule.scoring == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    else:
        # sigmoid without overflow, and to float32's relative precision for small
        # scores too (0.5 * tanh(x / 2) + 0.5 loses it where tanh nears -1)
        e = np.exp(-np.abs(logits))
        scores = np.where(logits >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)
    choice = scores if correction_bias is None else scores + correction_bias
    if rule.topk_method != "greedy":
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, rule.n_group, experts // rule.n_group)
        if rule.topk_method == "noaux_tc":
            group_scores = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
        else:
            group_scores = grouped.max(axis=2)
        best_groups = np.argsort(-group_scores, axis=1, kind="stable")[:, :rule.topk_group]
        keep = np.zeros((tokens, rule.n_group), bool)
        np.put_along_axis(keep, best_groups, True, axis=1)
        choice = np.where(np.repeat(keep, experts // rule.n_group, axis=1), choice, -np.inf)
    ids = np.argsort(-choice, axis=1, kind="stable")[:, :rule.top_k]
    weights = np.take_along_axis(scores, ids, axis=1)
    if rule.renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return (weights * np.float32(rule.scaling)).astype(np.float32), ids.astype(np.int32)


def host_float32(obj, name: str) -> np.ndarray:
    """A float32 numpy copy (or view) of an array of numpy, PyTorch, CuPy or any
    library exporting host memory through DLPack."""
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float32, copy=False)
    module = type(obj).__module__.split(".")[0]
    if module == "torch":
        import torch

        return obj.detach().to("cpu", torch.float32).numpy()
    if module == "cupy":
        import cupy

        return cupy.asnumpy(obj).astype(np.float32, copy=False)
    if hasattr(obj, "__dlpack__"):
        from .arrays import import_array, to_caller

        t = import_array(obj, name)
        if t.device[0] != 1:
            raise ValueError(f"{name}: an array on a device from {module}; routing reads it on the host, which "
                             "ferrum-moe does for numpy, PyTorch and CuPy arrays only")
        return np.asarray(to_caller(t, np.empty(0)), dtype=np.float32)
    raise TypeError(f"{name}: expected an array (numpy, PyTorch, CuPy, ...); got {type(obj).__name__}")


def like(a: np.ndarray, reference):
    """Host array ``a`` as ``reference``'s library on its device: PyTorch and CuPy
    arrays get their own type back, every other input numpy."""
    module = type(reference).__module__.split(".")[0]
    if module == "torch":
        import torch

        return torch.from_numpy(a).to(reference.device)
    if module == "cupy":
        import cupy

        return cupy.asarray(a)
    return a


class Router:
    """The gate of one MoE layer: ``weight`` [num_experts, hidden] (kept as
    float32 on the host), ``rule``, and DeepSeek-V3's ``correction_bias``
    [num_experts] where the rule uses one."""

    def __init__(self, weight, rule: RoutingRule, correction_bias=None):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.rule = rule
        self.correction_bias = None if correction_bias is None else np.asarray(correction_bias, np.float32)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]

    def __repr__(self) -> str:
        return f"Router(num_experts={self.num_experts}, hidden={self.hidden}, {self.rule.describe()})"

    def __call__(self, hidden_states):
        """hidden_states [num_tokens, hidden] -> (topk_weights float32, topk_ids
        int32), both [num_tokens, top_k], in the caller's library (numpy,
        PyTorch or CuPy) on its device. Computed on the host: device inputs are
        copied there and back (a synchronisation)."""
        x = host_float32(hidden_states, "hidden_states")
        if x.ndim != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"route: hidden_states must be [num_tokens, hidden={self.hidden}]; got shape "
                             f"{list(x.shape)}")
        weights, ids = select_experts(x @ self.weight.T, self.rule, self.correction_bias)
        return like(weights, hidden_states), like(ids, hidden_states)
