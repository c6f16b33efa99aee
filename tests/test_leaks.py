"""Memory stays flat over many round trips: 100,000 DLPack imports and exports,
10,000 stack create/destroy cycles. A leak of one small object per iteration
would add megabytes; the bounds leave room for the allocators' own growth."""

import os

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe.arrays import import_array

from conftest import random_weight, rel_error

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.environ.get("FERRUM_MOE_SANITIZED") == "1",
                                reason="AddressSanitizer keeps freed memory in quarantine; scripts/sanitize.sh "
                                       "checks leaks with LeakSanitizer instead")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_100000_dlpack_round_trips_keep_memory_flat(rng):
    a = rng.standard_normal((8, 8)).astype(np.float32)

    def round_trips(n):
        for _ in range(n):
            t = import_array(a, "a")
            np.from_dlpack(t)  # a consumed export
            t.__dlpack__(max_version=(1, 1))  # an unconsumed one, freed by its capsule
            t.view([64])

    round_trips(2_000)  # allocator pools warm up
    before = rss()
    round_trips(100_000)
    # One leaked export (its context and managed tensor) per trip would be over 10 MiB.
    assert rss() - before < 4 * MiB, f"RSS grew by {(rss() - before) / MiB:.1f} MiB"


def test_10000_stack_create_destroy_cycles_keep_memory_flat(rng):
    weights = [random_weight(rng, 256, 64, group_size=64, sym=False, act_order=True, dtype="float32")]
    x = rng.standard_normal((2, 256)).astype(np.float32)
    expected = x.astype(np.float64) @ weights[0].dequantize(np.float64)

    def cycles(n):
        for i in range(n):
            stack = fm.ExpertStack.from_gptq(weights, dtype="float32")
            if i % 100 == 0:
                assert rel_error(stack.gemm_batched(x, [[0, 0, 0, 2]]), expected) < 2e-5
            del stack

    cycles(500)
    before = rss()
    cycles(10_000)
    # A leaked stack holds its repacked weights (over 8 KiB here): 80 MiB over the run.
    assert rss() - before < 8 * MiB, f"RSS grew by {(rss() - before) / MiB:.1f} MiB"
