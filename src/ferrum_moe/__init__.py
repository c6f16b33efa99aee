"""ferrum-moe: quantized (GPTQ/AWQ INT4/INT8) Mixture-of-Experts GEMMs for any
array library (numpy, CuPy, PyTorch, JAX: anything with __dlpack__), computed
by backend plugins (CPU built in; CUDA as ferrum-moe-cuda)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from . import _core, awq, gptq
from ._core import Tensor
from .discovery import BackendInfo, BackendUnavailableError, backends, get_backend
from .expert_parallel import ExpertParallelMoE, Placement, load_expert_parallel_layer
from .gptq import GPTQWeight
from .moe import MoE, fused_moe
from .checkpoint import CheckpointError
from .pretrained import load_moe_layers
from .routing import Routing, moe_align_block_size, routing_buffer_sizes
from .stack import ExpertStack, Linear
from .tuning import tune_block_sizes

try:
    __version__ = importlib.metadata.version("ferrum-moe")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"


def get_include() -> str:
    """The directory holding ferrum_moe/plugin.h, plugin.hpp and dlpack.h."""
    return str(Path(_core.__file__).parent / "include")


def get_cmake_dir() -> str:
    """The directory holding ferrum_moeConfig.cmake (for find_package(ferrum_moe CONFIG))."""
    return str(Path(_core.__file__).parent / "cmake")


__all__ = [
    "BackendInfo", "BackendUnavailableError", "ExpertParallelMoE", "ExpertStack", "GPTQWeight", "Linear", "MoE",
    "Placement", "Routing", "Tensor",
    "awq", "backends", "fused_moe", "get_backend", "get_cmake_dir", "get_include", "gptq", "load_expert_parallel_layer",
    "moe_align_block_size", "routing_buffer_sizes", "tune_block_sizes",
]
__all__ += ["CheckpointError", "load_moe_layers"]
