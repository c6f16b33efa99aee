"""Shared fixtures: fresh random inputs and the targets (backend, device,
array library) every API test runs on. The references live in ferrum_moe.testing."""

from __future__ import annotations

import functools
import os

import ml_dtypes
import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe.testing import (NUMPY_DTYPES, REL_TOL, as64, poisoned, random_activations,  # noqa: F401
                                random_weight, reference_align, reference_moe, rel_error, silu_product)


@pytest.fixture(scope="session", autouse=True)
def empty_block_table_cache(tmp_path_factory):
    """The suite never reads the block tables this machine tuned for its own
    layers (fm.tune_block_sizes): the cache is an empty directory of its own."""
    from ferrum_moe import block_tables

    before = os.environ.get(block_tables.CACHE_ENV)
    os.environ[block_tables.CACHE_ENV] = str(tmp_path_factory.mktemp("ferrum-moe-cache"))
    block_tables.reread()
    yield
    if before is None:
        del os.environ[block_tables.CACHE_ENV]
    else:
        os.environ[block_tables.CACHE_ENV] = before
    block_tables.reread()


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed so a failure can be replayed
    with FERRUM_MOE_TEST_SEED."""
    seed = int(os.environ.get("FERRUM_MOE_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed} for {request.node.name}")
    return np.random.default_rng(seed)


class Target:
    """Where a test runs: a backend, a device, and the array library its inputs
    come from (results must come back as that library's arrays)."""

    def __init__(self, backend: str, device: str, library: str, dtypes):
        self.backend, self.device, self.library, self.dtypes = backend, device, library, dtypes

    def __repr__(self):
        return f"{self.backend}-{self.library}"

    def put(self, a: np.ndarray):
        """A host array on this target's device, in its library."""
        if self.library == "numpy":
            return a
        import torch

        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def get(self, a) -> np.ndarray:
        """A result back on the host, as float64 for floats."""
        if self.library == "numpy":
            assert isinstance(a, np.ndarray), f"numpy in must give numpy out; got {type(a).__name__}"
            return a
        import torch

        assert isinstance(a, torch.Tensor), f"torch in must give torch out; got {type(a).__name__}"
        assert a.device.type == self.device.split(":")[0]
        if a.dtype == torch.bfloat16:
            return a.cpu().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return a.cpu().numpy()

    def stack(self, weights, dtype):
        return fm.ExpertStack.from_gptq(weights, backend=self.backend, device=self.device, dtype=dtype)


def _targets():
    targets = [Target("cpu", "cpu", "numpy", ["float32", "float16", "bfloat16"])]
    try:
        import torch  # noqa: F401

        targets.append(Target("cpu", "cpu", "torch", ["float32", "float16", "bfloat16"]))
    except ImportError:
        pass
    if any(b.name == "cuda" and b.available for b in fm.backends()):
        targets.append(Target("cuda", "cuda", "torch", ["float16", "bfloat16"]))
    return targets


TARGETS = _targets()


@pytest.fixture(params=TARGETS, ids=repr)
def target(request) -> Target:
    return request.param


# Property-based tests (test_properties.py, test_checkpoint_fuzz.py): a fixed
# budget per test, scaled by the profile FERRUM_MOE_HYPOTHESIS names. "ci" (the
# default) keeps the whole run to about a thousand inputs; "thorough" (25x) is
# the run before a release.
HYPOTHESIS_PROFILES = {"ci": 1, "thorough": 25}
HYPOTHESIS_PROFILE = os.environ.get("FERRUM_MOE_HYPOTHESIS", "ci")
if HYPOTHESIS_PROFILE not in HYPOTHESIS_PROFILES:
    raise ValueError(f"FERRUM_MOE_HYPOTHESIS: expected one of {sorted(HYPOTHESIS_PROFILES)}; got {HYPOTHESIS_PROFILE!r}")
# Inputs each property test ran, reported at the end of the session, and for
# tests that sort their inputs by outcome (loaded, refused, ...) how many had each.
hypothesis_inputs: dict[str, int] = {}
hypothesis_outcomes: dict[str, dict[str, int]] = {}


def pytest_terminal_summary(terminalreporter):
    if hypothesis_inputs:
        total = sum(hypothesis_inputs.values())
        terminalreporter.write_line(f"hypothesis ({HYPOTHESIS_PROFILE} profile): {total} inputs over "
                                    f"{len(hypothesis_inputs)} property tests")
        for name, count in sorted(hypothesis_inputs.items()):
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(hypothesis_outcomes.get(name, {}).items()))
            terminalreporter.write_line(f"  {count:6d}  {name}" + (f" ({outcomes})" if outcomes else ""))


def budget(examples: int):
    """Settings of a property test of `examples` inputs in the ci profile."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=examples * HYPOTHESIS_PROFILES[HYPOTHESIS_PROFILE], deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def counted(test):
    """Counts every input the test runs (shrinking included) for the session's report."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        hypothesis_inputs[test.__name__] = hypothesis_inputs.get(test.__name__, 0) + 1
        return test(*args, **kwargs)
    return run
