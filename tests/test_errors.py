"""Bad input gets a clear error naming the argument, what was expected and what
came; nothing crashes, nothing is written out of bounds."""

import numpy as np
import pytest

import ferrum_moe as fm

from conftest import random_weight


@pytest.fixture
def stack(rng):
    return fm.ExpertStack.from_gptq([random_weight(rng, 64, 32, group_size=32) for _ in range(4)], dtype="float16")


def x16(rows=3, k=64):
    return np.ones((rows, k), np.float16)


@pytest.mark.parametrize("dispatch, message", [
    ([4, 0, 0, 1], r"dispatches\[0\] = \(expert 4, in_row 0, out_row 0, m 1\): expert must be in \[0, 4\)"),
    ([-1, 0, 0, 1], r"expert -1.*expert must be in \[0, 4\)"),
    ([0, 2, 0, 2], "input rows exceed x's 3 rows"),
    ([0, 0, 3, 1], "output rows exceed out's 3 rows"),
    ([0, -1, 0, 1], "input rows exceed"),
    ([0, 0, 0, -1], "m must be >= 0"),
])
def test_out_of_bounds_dispatches_are_refused(stack, dispatch, message):
    out = np.full((3, 32), 7, np.float16)
    with pytest.raises(ValueError, match=message):
        stack.gemm_batched(x16(), [dispatch], out=out)
    assert np.all(out == 7), "nothing is written when a dispatch is refused"


@pytest.mark.parametrize("x, error, message", [
    (np.ones((3, 64), np.float32), TypeError, r"gemm_batched: x must have dtype float16 \(the stack's dtype\); got float32"),
    (np.ones((3, 48), np.float16), ValueError, r"x has shape \[3, 48\]; dimension 1 must be 64 \(the stack's k\)"),
    (np.ones((64, 3), np.float16).T, ValueError, "x must be row-major with adjacent elements in each row"),
    (np.ones((3, 64, 1), np.float16), ValueError, r"x must have 2 dimensions; got shape \[3, 64, 1\]"),
    ("abc", TypeError, r"x: expected an array with __dlpack__"),
])
def test_bad_activations_are_named(stack, x, error, message):
    with pytest.raises(error, match=message):
        stack.gemm_batched(x, [[0, 0, 0, 1]])


def test_dispatch_rows_must_be_integers_on_the_host(stack):
    with pytest.raises(TypeError, match="dispatches: must hold integers; got dtype float64"):
        stack.gemm_batched(x16(), np.array([[0.0, 0, 0, 1]]))
    with pytest.raises(ValueError, match=r"dispatches has shape \[1, 3\]; dimension 1 must be 4"):
        stack.gemm_batched(x16(), [[0, 0, 0]])


def test_out_must_match(stack):
    with pytest.raises(ValueError, match=r"out has shape \[3, 16\]; dimension 1 must be at least 32"):
        stack.gemm_batched(x16(), [[0, 0, 0, 1]], out=np.zeros((3, 16), np.float16))
    with pytest.raises(TypeError, match="out must have dtype float16 or float32; got float64"):
        stack.gemm_batched(x16(), [[0, 0, 0, 1]], out=np.zeros((3, 32)))


@pytest.mark.parametrize("offset, n, message", [
    (128, 16, r"expert_linear: offset 128 \+ n 16 exceeds the stacked N of 128 \(4 experts x 32\)"),
    (16, 24, r"offset 16 and offset \+ n 40 must be multiples of .* column alignment 16 \(or expert boundaries"),
    (8, 16, "must be multiples of the 'cpu' backend's column alignment 16"),
    (-16, 16, "exceeds the stacked N"),
])
def test_bad_expert_views_are_named(stack, offset, n, message):
    with pytest.raises(ValueError, match=message):
        stack.expert_linear(offset, n)


def test_expert_index_is_checked(stack):
    with pytest.raises(ValueError, match="expert: e=4 is out of range for a stack of 4 experts"):
        stack.expert(4)


def test_bias_must_match_the_view(stack):
    lin = stack.expert_linear(0, 16, bias=np.ones(32, np.float16))
    with pytest.raises(ValueError, match=r"bias has shape \[32\]; dimension 0 must be 16"):
        lin(x16())


def test_experts_of_a_stack_must_agree(rng):
    with pytest.raises(ValueError, match=r"weights\[1\] is K=64, N=16.*weights\[0\] is K=64, N=32"):
        fm.ExpertStack.from_gptq([random_weight(rng, 64, 32, group_size=32), random_weight(rng, 64, 16, group_size=32)])
    with pytest.raises(ValueError, match="expected at least one expert"):
        fm.ExpertStack.from_gptq([])
    with pytest.raises(ValueError, match="dtype: expected one of float32, float16, bfloat16; got 'int8'"):
        fm.ExpertStack.from_gptq([random_weight(rng, 64, 32, group_size=32)], dtype="int8")


def test_routing_arguments_are_checked(rng, stack):
    ids = rng.integers(0, 4, (5, 2))
    with pytest.raises(ValueError, match=r"moe_align_block_size: block_size must be in \[1, 65536\]; got 0"):
        fm.moe_align_block_size(ids, 0, 4)
    with pytest.raises(ValueError, match=r"topk_ids must be \[num_tokens, top_k\]; got shape \[10\]"):
        fm.moe_align_block_size(ids.reshape(-1), 16, 4)
    with pytest.raises(TypeError, match="topk_ids must have dtype int32 or int64; got float32"):
        fm.moe_align_block_size(ids.astype(np.float32), 16, 4)
    with pytest.raises(ValueError, match=r"expert_map has shape \[3\]; dimension 0 must be 4"):
        fm.moe_align_block_size(ids, 16, 4, expert_map=np.zeros(3, np.int32))
    r = fm.moe_align_block_size(ids, 16, 4)
    with pytest.raises(ValueError, match="x has 3 rows; the routing was built for 5 tokens"):
        stack.gemm_routed(x16(), r)
    with pytest.raises(TypeError, match="topk_weights must have dtype float32; got float16"):
        stack.gemm_routed(x16(5), r, topk_weights=np.ones((5, 2), np.float16))
    with pytest.raises(TypeError, match="routing: expected fm.Routing"):
        stack.gemm_routed(x16(5), (1, 2, 3))


def test_corrupt_host_routing_is_skipped_never_followed(rng, stack):
    """Routing arrays built by hand with out-of-range entries: every bad entry is
    skipped (the contract for device-resident indices too), nothing else happens."""
    sorted_ids = np.array([0, 1, 99999, -5, 2, 3, 4, 5], np.int32)
    expert_ids = np.array([0, 7, -3, 1], np.int32)
    post = np.array([1 << 30], np.int32)  # past the end of sorted_ids
    r = fm.Routing(sorted_ids, expert_ids, post, block_size=2, top_k=2, num_tokens=3)
    out = np.full((6, 32), np.nan, np.float16)
    stack.gemm_routed(x16(3), r, out=out)
    written = ~np.isnan(out).all(axis=1)
    # Blocks: 0 -> expert 0 (ids 0, 1), 1 -> expert 7 (out of range), 2 -> expert -3,
    # 3 -> expert 1 (ids 4, 5); ids 99999 and -5 are out of range.
    assert written.tolist() == [True, True, False, False, True, True]


def test_fused_moe_checks_its_stacks(rng):
    w13 = fm.ExpertStack.from_gptq([random_weight(rng, 64, 64, group_size=32)] * 2)
    w2 = fm.ExpertStack.from_gptq([random_weight(rng, 48, 64, group_size=16)] * 2)
    ids = np.zeros((2, 1), np.int32)
    tw = np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match=r"w2's k is 48; it must be half of w13's n_per_expert \(64 // 2 = 32"):
        fm.fused_moe(x16(2), w13, w2, tw, ids)
    good_w2 = fm.ExpertStack.from_gptq([random_weight(rng, 32, 64, group_size=32)] * 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        fm.fused_moe(x16(2), w13, good_w2, tw, ids, activation="gelu")
    with pytest.raises(TypeError, match="w2 must be an fm.ExpertStack"):
        fm.fused_moe(x16(2), w13, "w2", tw, ids)


def test_bad_streams_are_named():
    from ferrum_moe.arrays import stream_handle

    with pytest.raises(TypeError, match="stream: expected None, an int handle or an object with __cuda_stream__; got str"):
        stream_handle("default")
    with pytest.raises(ValueError, match=r"stream: a stream handle is in \[0, 2\*\*63\); got -3"):
        stream_handle(-3)


def test_cpu_stacks_keep_weights_packed(rng):
    weights = [random_weight(rng, 1024, 512, bits=4, group_size=32, sym=False) for _ in range(4)]
    stack = fm.ExpertStack.from_gptq(weights, dtype="float16")
    gptq_bytes = sum(w.qweight.nbytes + w.scales.nbytes + w.qzeros.nbytes for w in weights)
    assert stack.resident_bytes <= 1.25 * gptq_bytes


def test_output_sizes_that_overflow_are_refused_before_allocating(stack):
    with pytest.raises(ValueError, match=r"cannot allocate float16\[140737488355329, 32\]: dimensions must be >= 0 and "
                                         r"the tensor under 2\^48"):
        stack.gemm_batched(x16(), [[0, 0, 2**47, 1]])


def test_output_sizes_beyond_memory_fail_cleanly(stack):
    with pytest.raises(MemoryError, match=r"allocating float16\[1099511627777, 32\] on cpu: out of memory"):
        stack.gemm_batched(x16(), [[0, 0, 2**40, 1]])


@pytest.mark.parametrize("row", [[0, 2**63 - 1, 0, 1], [0, 0, 2**63 - 1, 1], [0, 2, 2, 2**63 - 2], [0, 0, 2**40, 2**40]])
def test_hostile_dispatch_rows_are_named_before_anything_is_allocated(stack, row):
    """Rows near 2**63 must not wrap past the bounds checks, nor size a result."""
    with pytest.raises(ValueError, match=r"dispatches\[0\] = .*rows exceed"):
        stack.gemm_batched(x16(), [row])
    with pytest.raises(ValueError, match=r"dispatches\[0\] = .*rows exceed"):
        stack.gemm_batched(x16(), [row], out=np.zeros((3, 32), np.float16))


def test_absurd_block_sizes_are_refused(rng):
    with pytest.raises(ValueError, match=r"moe_align_block_size: block_size must be in \[1, 65536\]; got 4294967296"):
        fm.moe_align_block_size(rng.integers(0, 4, (3, 2)), 2**32, 4)


def test_a_wrong_x_is_named_before_the_dispatch_table(stack):
    with pytest.raises(TypeError, match="gemm_batched: x must have dtype float16"):
        stack.gemm_batched(np.zeros((3, 64), np.float32), [[9, 0, 0, 1]])
    with pytest.raises(ValueError, match=r"gemm_batched: x has shape \[3, 32\]; dimension 1 must be 64"):
        stack.gemm_batched(np.zeros((3, 32), np.float16), [[0, 5, 0, 7]], out=np.zeros((3, 32), np.float16))


def test_views_and_expert_indices_must_be_ints(stack):
    with pytest.raises(TypeError, match=r"expert: e must be an int; got 1.5"):
        stack.expert(1.5)
    with pytest.raises(TypeError, match=r"expert_linear: offset must be an int; got 16.0"):
        stack.expert_linear(16.0, 16)
