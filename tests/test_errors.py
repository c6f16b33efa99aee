"""Bad input gets a clear error naming the argument, what was expected and what
came; nothing crashes, nothing is written out of bounds."""

import numpy as np
import pytest

import ferrum_moe as fm

from conftest import random_weight, rel_error


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


def test_gated_routing_arguments_are_checked(rng, stack):
    """gemm_routed(activation=...): the gated output's shape, dtype and memory,
    in the Python API and as the layer passes both outputs to the core."""
    from ferrum_moe.arrays import import_array

    r = fm.moe_align_block_size(rng.integers(0, 4, (5, 2)), 16, 4)
    with pytest.raises(ValueError, match="gemm_routed: activation must be None or 'silu'; got 'gelu'"):
        stack.gemm_routed(x16(5), r, activation="gelu")
    with pytest.raises(ValueError, match=r"gemm_routed: out has shape \[10, 32\]; dimension 1 must be 16 \(n_per_expert / 2\)"):
        stack.gemm_routed(x16(5), r, activation="silu", out=np.zeros((10, 32), np.float16))
    with pytest.raises(TypeError, match="gemm_routed: out must have dtype float16; got float32"):
        stack.gemm_routed(x16(5), r, activation="silu", out=np.zeros((10, 16), np.float32))
    odd = fm.ExpertStack.from_gptq([random_weight(rng, 64, 33, group_size=32)], dtype="float16")
    with pytest.raises(ValueError, match=r"gemm_routed: activation needs an even n_per_expert \(\[gate \| up\]\); "
                                         "this stack has 33"):
        odd.gemm_routed(x16(5), fm.moe_align_block_size(np.zeros((5, 2), np.int32), 16, 1), activation="silu")
    r1 = fm.moe_align_block_size(np.zeros((5, 2), np.int32), 16, 1)
    with pytest.raises(ValueError, match=r"gemm_routed: a gated output needs an even n_per_expert \(\[gate \| up\]\); "
                                         "the stack has 33"):
        odd._core.gemm_routed(import_array(x16(5), "x"), *r1.tensors(0), 16, 2, None, None, 0,
                              gated_out=import_array(np.zeros((10, 16), np.float16), "out"))
    x = np.zeros((5, 64), np.float16)
    with pytest.raises(ValueError, match="gemm_routed: out overlaps x in memory"):
        stack.gemm_routed(x, r, activation="silu", out=x.reshape(10, 32)[:, :16])
    t = lambda a, name: import_array(a, name)  # noqa: E731
    gate_up, act = np.zeros((10, 32), np.float16), np.zeros((10, 16), np.float16)
    with pytest.raises(ValueError, match="gemm_routed: gated_out overlaps out in memory"):
        stack._core.gemm_routed(t(x16(5), "x"), *r.tensors(0), 16, 2, None, t(gate_up, "out"), 0,
                                gated_out=t(gate_up[:, :16], "gated_out"))
    with pytest.raises(ValueError, match=r"gemm_routed: gated_out has shape \[9, 16\]; dimension 0 must be 10"):
        stack._core.gemm_routed(t(x16(5), "x"), *r.tensors(0), 16, 2, None, t(gate_up, "out"), 0,
                                gated_out=t(act[:9], "gated_out"))
    with pytest.raises(ValueError, match="gemm_routed: activation must be FM_ACTIVATION_SILU \\(0\\); got 7"):
        stack._core.gemm_routed(t(x16(5), "x"), *r.tensors(0), 16, 2, None, None, 0, gated_out=t(act, "out"),
                                activation=7)
    with pytest.raises(ValueError, match="gemm_routed: out is missing"):
        stack._core.gemm_routed(t(x16(5), "x"), *r.tensors(0), 16, 2, None, None, 0)


def test_pair_routing_arguments_are_checked(rng, stack):
    """gemm_routed's pair routing (ABI 1.2), as the layer calls it for one token."""
    from ferrum_moe.arrays import import_array

    def call(x=x16(2), ids=np.zeros((2, 3), np.int32), num_experts=4, expert_map=None, tw=None,
             out=np.zeros((6, 32), np.float16)):
        def t(a, name):
            return None if a is None else import_array(a, name)
        stack._core.gemm_routed_pairs(t(x, "x"), t(ids, "topk_ids"), num_experts, t(expert_map, "expert_map"),
                                      t(tw, "topk_weights"), t(out, "out"))

    call()
    with pytest.raises(TypeError, match="gemm_routed: topk_ids must have dtype int32 or int64; got float32"):
        call(ids=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"gemm_routed: topk_ids has shape \[3, 3\]; dimension 0 must be 2 \(x's rows\)"):
        call(ids=np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError, match=r"gemm_routed: num_experts must be in \[1, 2\^31 - 1\].*; got 0"):
        call(num_experts=0)
    with pytest.raises(ValueError, match=r"gemm_routed: expert_map has shape \[3\]; dimension 0 must be 4 \(num_experts\)"):
        call(expert_map=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"gemm_routed: expert_map\[1\] = -2; entries must be a local expert id"):
        call(expert_map=np.array([0, -2, 1, 2], np.int32))
    with pytest.raises(ValueError, match=r"gemm_routed: out has shape \[4, 32\]; dimension 0 must be 6 \(num_tokens \* top_k\)"):
        call(out=np.zeros((4, 32), np.float16))
    with pytest.raises(ValueError, match=r"gemm_routed: topk_weights has shape \[2, 2\]; dimension 1 must be 3 \(top_k\)"):
        call(tw=np.ones((2, 2), np.float32))


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


def test_hostile_rows_size_no_result_before_every_row_is_checked(stack):
    """A huge but valid row next to an invalid one: the invalid one is named,
    nothing is allocated for the huge one first (that would be a MemoryError)."""
    with pytest.raises(ValueError, match=r"dispatches\[1\] = \(expert 9, .*expert must be in \[0, 4\)"):
        stack.gemm_batched(x16(), [[0, 0, 2**40, 1], [9, 0, 0, 1]])
    with pytest.raises(ValueError, match=r"dispatches\[0\] = .*output rows exceed 2\^48"):
        stack.gemm_batched(x16(), [[0, 0, 2**62, 1]])


@pytest.mark.parametrize("rows, message", [
    ([[0, 2**64, 0, 1]], "dispatches: values must fit in int64; got ints beyond 64 bits"),
    (np.array([[0, 2**63, 0, 1]], np.uint64), r"dispatches: values must fit in int64; got \[0, 9223372036854775808\]"),
    ([[0, 1], [0, 1, 2, 3]], "dispatches: setting an array element with a sequence"),
])
def test_dispatch_tables_beyond_int64_are_named(stack, rows, message):
    with pytest.raises(ValueError, match=message):
        stack.gemm_batched(x16(), rows)


def test_a_dispatch_row_that_writes_before_a_sliced_out_is_refused(stack):
    """out is a slice of a bigger buffer: a wrapped out_row must not reach the row before it."""
    backing = np.full((5, 32), 7, np.float16)
    with pytest.raises(ValueError, match="output rows exceed out's 3 rows"):
        stack.gemm_batched(x16(), [[0, 0, 2**63 - 1, 1]], out=backing[1:4])
    assert np.all(backing == 7)


@pytest.mark.parametrize("call, error, message", [
    (lambda: fm.routing_buffer_sizes(2**63 - 1, 1, 2, 16), ValueError,
     r"routing_buffer_sizes: num_tokens \* top_k = 9223372036854775807 exceeds 2\^31 - 1"),
    (lambda: fm.routing_buffer_sizes(1, 1, 32769, 65536), ValueError,
     r"routing buffers: num_tokens \* top_k \+ num_local_experts \* \(block_size - 1\) must be at most 2\^31 - 1"),
    (lambda: fm.routing_buffer_sizes(2**31, 1, 1, 16), ValueError, "exceeds 2\\^31 - 1"),
    (lambda: fm.routing_buffer_sizes(4, 2, 8, 16.0), TypeError, "routing_buffer_sizes: block_size must be an int"),
    (lambda: fm.moe_align_block_size(np.zeros((2, 1), np.int32), 2**63, 4), ValueError,
     r"moe_align_block_size: block_size must be in \[1, 65536\]; got 9223372036854775808"),
    (lambda: fm.moe_align_block_size(np.zeros((2, 1), np.int32), 16, 2**64), ValueError,
     r"moe_align_block_size: num_experts must be in \[1, 2147483647\]; got 18446744073709551616"),
    (lambda: fm.Routing(*[np.zeros(1, np.int32)] * 3, block_size=16.5, top_k=1, num_tokens=1), TypeError,
     r"Routing: block_size must be an int; got 16.5 \(float\)"),
    (lambda: fm.Routing(*[np.zeros(1, np.int32)] * 3, block_size=16, top_k=2**62, num_tokens=1), ValueError,
     r"Routing: top_k must be in \[1, 2147483647\]; got 4611686018427387904"),
    (lambda: fm.Routing(*[np.zeros(1, np.int32)] * 3, block_size=16, top_k=8, num_tokens=2**30), ValueError,
     r"Routing: num_tokens must be in \[0, 268435455\]; got 1073741824"),
])
def test_routing_sizes_that_overflow_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_routing_buffers_hold_int32_positions_up_to_the_limit():
    # The largest count whose every position fits an int32, and one past it.
    assert fm.routing_buffer_sizes(2**31 - 1 - 65535 * 32767, 1, 32767, 65536)[0] == 2**31 - 1
    with pytest.raises(ValueError, match="must be at most 2\\^31 - 1"):
        fm.routing_buffer_sizes(2**31 - 65535 * 32767, 1, 32767, 65536)


def test_a_layers_routing_buffers_grow_for_other_blocks_only_where_their_positions_fit():
    """A layer's routing buffers are grown for every default block (8-128) at a
    token count; where the largest block's padding would pass the int32
    positions, they hold this block's own sizes instead of refusing the call."""
    from ferrum_moe.routing import _capacities

    experts = (2**31 - 1) // 127 + 1  # block 128's padding alone passes 2^31 - 1; block 1 pads nothing
    assert _capacities(4, experts, 1, 4, 4) == (4, 4)
    padded, blocks = fm.routing_buffer_sizes(2, 2, 8, 16)
    assert _capacities(4, 8, 16, padded, blocks) == (fm.routing_buffer_sizes(2, 2, 8, 128)[0],
                                                      -(-fm.routing_buffer_sizes(2, 2, 8, 8)[0] // 8))


@pytest.mark.parametrize("call, error, message", [
    (lambda s: s.gemm_batched(x16(), [[0, 0, 0, 1]], stream=2**64), ValueError,
     r"stream: a stream handle is in \[0, 2\*\*63\); got 18446744073709551616"),
    (lambda s: s.gemm_batched(x16(), [[0, 0, 0, 1]], stream=1.5), TypeError, "stream: expected None, an int handle"),
    (lambda s: s.expert("1"), TypeError, r"expert: e must be an int; got '1' \(str\)"),
    (lambda s: s.expert(True), TypeError, r"expert: e must be an int; got True \(bool\)"),
    (lambda s: fm.ExpertStack.from_gptq(123), TypeError,
     "weights: expected a GPTQWeight, a sequence of them .* or a dict of stacked arrays; got int"),
    (lambda s: fm.ExpertStack.from_gptq(fm.gptq.quantize(np.ones((32, 16)), 4, 32), device=("cpu", 0)), ValueError,
     r"device: a \(device_type, device_id\) tuple holds two ints in \[0, 2\*\*31\); got \('cpu', 0\)"),
    (lambda s: fm.ExpertStack.from_gptq(fm.gptq.quantize(np.ones((32, 16)), 4, 32), device=(1, 2**40)), ValueError,
     r"device: a \(device_type, device_id\) tuple holds two ints in \[0, 2\*\*31\); got \(1, 1099511627776\)"),
])
def test_unclear_refusals_now_name_their_argument(stack, call, error, message):
    with pytest.raises(error, match=message):
        call(stack)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bits=4.0), TypeError, r"bits must be an int; got 4.0 \(float\)"),
    (dict(group_size="128"), TypeError, r"group_size must be an int; got '128' \(str\)"),
    (dict(k=25.5), TypeError, r"k must be an int or None; got 25.5"),
    (dict(k=0), ValueError, "k must be positive; got 0"),
])
def test_gptq_scalars_must_be_ints(kwargs, error, message):
    args = dict(qweight=np.zeros((4, 8), np.int32), scales=np.ones((1, 8), np.float16), bits=4, group_size=-1)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        fm.GPTQWeight(**args)


@pytest.mark.parametrize("op", ["gemm_batched", "Linear", "gemm_routed"])
@pytest.mark.parametrize("overlap", ["same array", "shifted by a row"])
def test_an_out_overlapping_x_is_refused(rng, op, overlap):
    """float32 stack: out could be x itself; writing it while x is still read
    would give wrong numbers, so it is refused and nothing is written."""
    weights = [random_weight(rng, 64, 64, group_size=32, dtype="float32") for _ in range(2)]
    stack = fm.ExpertStack.from_gptq(weights, dtype="float32")
    buf = rng.standard_normal((6, 64)).astype(np.float32)
    before = buf.copy()
    x, out = (buf[:4], buf[:4]) if overlap == "same array" else (buf[:4], buf[1:5])
    routing = fm.moe_align_block_size(np.zeros((4, 1), np.int32), 16, 2)
    call = {"gemm_batched": lambda: stack.gemm_batched(x, [[1, 0, 0, 4]], out=out),
            "Linear": lambda: stack.expert(1)(x, out=out),
            "gemm_routed": lambda: stack.gemm_routed(x, routing, out=out)}[op]
    with pytest.raises(ValueError, match=f"{op}: out overlaps x in memory"):
        call()
    np.testing.assert_array_equal(buf, before)


def test_disjoint_column_windows_of_one_buffer_are_accepted(rng):
    """x and out interleaved in one [M, 96] buffer share no element: accepted, and right."""
    weights = [random_weight(rng, 64, 32, group_size=32, dtype="float32")]
    stack = fm.ExpertStack.from_gptq(weights, dtype="float32")
    buf = np.full((5, 96), np.nan, np.float32)
    buf[:, :64] = rng.standard_normal((5, 64))
    x, out = buf[:, :64], buf[:, 64:]
    expected = x.astype(np.float64) @ weights[0].dequantize(np.float64)
    stack.gemm_batched(x, [[0, 0, 0, 5]], out=out)
    assert rel_error(out, expected) < 2e-5


def test_a_bias_overlapping_out_is_refused(rng):
    weights = [random_weight(rng, 64, 32, group_size=32, dtype="float32")]
    stack = fm.ExpertStack.from_gptq(weights, dtype="float32")
    out = np.zeros((3, 32), np.float32)
    lin = stack.expert(0, bias=out[0])
    with pytest.raises(ValueError, match="Linear: out overlaps bias in memory"):
        lin(np.ones((3, 64), np.float32), out=out)


def _layer_stacks(rng, e=4, hidden=64, inter=32):
    w13 = fm.ExpertStack.from_gptq([random_weight(rng, hidden, 2 * inter, group_size=32) for _ in range(e)])
    w2 = fm.ExpertStack.from_gptq([random_weight(rng, inter, hidden, group_size=32) for _ in range(e)])
    return w13, w2


def test_layer_scalars_are_named(rng):
    w13, w2 = _layer_stacks(rng)
    with pytest.raises(TypeError, match=r"MoE: top_k must be an int; got 1.5 \(float\)"):
        fm.MoE(w13, w2, top_k=1.5)
    with pytest.raises(ValueError, match=r"MoE: block_size must be in \[0, 65536\]; got -1"):
        fm.MoE(w13, w2, top_k=1, block_size=-1)
    with pytest.raises(ValueError, match=r"fused_moe: block_size must be in \[0, 65536\]; got 9223372036854775808"):
        fm.fused_moe(x16(1), w13, w2, np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32), block_size=2**63)


def test_an_expert_map_naming_experts_the_stacks_lack_is_refused(rng):
    w13, w2 = _layer_stacks(rng)
    expert_map = np.array([0, 1, 4, -1, 2, 3], np.int32)  # local 4 of a 4-expert stack
    ids, tw = np.array([[2, 0], [5, 1]], np.int32), np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"fused_moe: expert_map names local expert 4; the stacks hold 4"):
        fm.fused_moe(x16(2), w13, w2, tw, ids, expert_map=expert_map)
    with pytest.raises(ValueError, match=r"MoE: expert_map names local expert 4; the stacks hold 4 \(local ids"):
        fm.MoE(w13, w2, top_k=2, expert_map=expert_map)


def test_an_8_bit_v1_zero_of_256_is_refused_not_truncated(rng):
    """A stored 0xFF zero in 8-bit GPTQ v1 means 256 (dequantize() says so); a
    uint8 zero point would silently compute with 0."""
    w = random_weight(rng, 64, 32, bits=8, group_size=32, sym=False)
    qzeros = w.qzeros.view(np.uint32).copy()
    qzeros[0, 0] |= 0xFF  # column 0 of group 0
    odd = fm.GPTQWeight(w.qweight, w.scales, qzeros.view(np.int32), bits=8, group_size=32, sym=False)
    assert odd.zeros()[0, 0] == 256
    with pytest.raises(ValueError, match=r"weights\[1\].qzeros: a stored 8-bit v1 zero of 0xFF means a zero point of 256"):
        fm.ExpertStack.from_gptq([w, odd])


def test_a_group_size_beyond_int32_is_the_single_group(rng):
    w = random_weight(rng, 64, 32, group_size=-1, dtype="float32")
    huge = fm.GPTQWeight(w.qweight, w.scales, w.qzeros, bits=4, group_size=2**31)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = fm.Linear.from_gptq(huge, dtype="float32")(x)
    assert rel_error(y, x.astype(np.float64) @ w.dequantize(np.float64)) < 2e-5


def test_stack_sizes_that_would_wrap_the_repack_are_refused_before_the_backend():
    """K = 2**31, N = 2**36: the CPU backend's repack size would wrap to 0.
    Such a qweight cannot be a real array; its metadata is refused on import,
    and sizes beyond 2^48 are refused even with small arrays."""
    from ferrum_moe.arrays import import_array
    from handmade_dlpack import Producer

    cpu = fm.get_backend("cpu")
    words = np.zeros(16, np.int32)
    with pytest.raises(ValueError, match=r"qweight: DLPack tensor: shape \[1, 268435456, 68719476736\] of int32 "
                                         r"exceeds 2\^48 bytes"):
        import_array(Producer(words, (1, 2**28, 2**36)), "qweight")
    qweight, scales = import_array(np.zeros((1, 1, 1), np.int32), "qweight"), import_array(np.ones((1, 1, 1), np.float16), "scales")
    with pytest.raises(ValueError, match=r"ExpertStack: num_experts, k and n_per_expert must be in \[1, 2\^48\]; got 1, "
                                         r"1125899906842624, 1"):
        cpu.create_stack(1, 0, "float16", 1, 2**50, 1, 4, -1, qweight, scales, None, None)


def test_the_cores_layer_steps_check_their_own_arguments(rng):
    """fm.MoE hands a call's steps to the core in one go (core/moe.hpp); called
    directly, the core still names what is missing or does not match, before
    it queues anything."""
    from ferrum_moe import _core
    from ferrum_moe.arrays import import_array

    w13 = fm.ExpertStack.from_gptq([random_weight(rng, 64, 64, group_size=32) for _ in range(4)], dtype="float16")
    w2 = fm.ExpertStack.from_gptq([random_weight(rng, 32, 64, group_size=32) for _ in range(4)], dtype="float16")
    t = {name: import_array(a, name) for name, a in (
        ("x", np.ones((2, 64), np.float16)), ("ids", np.array([[0, 1], [2, 3]], np.int32)),
        ("tw", np.full((2, 2), 0.5, np.float32)), ("tw3", np.full((2, 3), 0.5, np.float32)),
        ("gate_up", np.zeros((4, 64), np.float16)), ("act", np.zeros((4, 32), np.float16)),
        ("down", np.zeros((4, 64), np.float32)))}
    out = np.full((2, 64), 7, np.float16)
    ot = import_array(out, "out")
    tail = (t["gate_up"], t["act"], t["down"], ot, 0)

    def layer(tw, block_size, *routing):
        _core.moe_layer(w13._core, w2._core, t["x"], t["ids"], tw, None, 4, False, block_size, *routing, *tail)

    with pytest.raises(ValueError, match=r"moe_layer: topk_weights has shape \[2, 3\]; dimension 1 must be 2 "
                                         r"\(topk_ids' columns\)"):
        layer(t["tw3"], 0, None, None, None)
    with pytest.raises(ValueError, match="moe_layer: a routing block needs align's three output buffers"):
        layer(t["tw"], 8, None, None, None)
    assert np.all(out == 7)
    layer(t["tw"], 0, None, None, None)  # pair routing: every pair its own block
    ref = fm.fused_moe(np.ones((2, 64), np.float16), w13, w2, np.full((2, 2), 0.5, np.float32),
                       np.array([[0, 1], [2, 3]], np.int32), block_size=8)
    assert rel_error(out, ref) < 2e-3
