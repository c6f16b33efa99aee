"""Every operation of the Python API against float64 references on dequantized
weights, on every available target (CPU with numpy and with PyTorch; CUDA with
PyTorch where a GPU is present). Outputs are poisoned with NaN first."""

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe.arrays import import_array, stream_handle, to_caller
from ferrum_moe.discovery import resolve
from ferrum_moe.moe import _Workspace
from ferrum_moe.routing import _align

from conftest import (NUMPY_DTYPES, REL_TOL, as64, poisoned, random_activations, random_weight, reference_align,
                      reference_moe, rel_error, silu_product)

FORMATS = [  # bits, group_size, sym, act_order
    (4, 128, True, False),
    (4, 32, False, False),
    (4, 64, True, True),
    (4, -1, False, False),
    (8, 128, True, False),
    (8, 32, False, True),
]


def _dtype_ok(target, dtype):
    if dtype not in target.dtypes:
        pytest.skip(f"{target.backend} computes in {target.dtypes}")


@pytest.mark.parametrize("bits, group_size, sym, act_order", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
# Every CUDA tile height: 8 (the swapped decode tile), 16 and 32 rows; 40
# (64-row tiles before Hopper, two 32-row ones on it); 200 (128-row, or 64-row
# ones when too few to fill the GPU).
@pytest.mark.parametrize("rows", [4, 12, 24, 40, 200])
def test_gemm_batched_matches_float64(rng, target, dtype, bits, group_size, sym, act_order, rows):
    _dtype_ok(target, dtype)
    e, k, n = 3, 320, 96  # 320 = a partial last group for 64 and 128
    weights = [random_weight(rng, k, n, bits=bits, group_size=group_size, sym=sym, act_order=act_order, dtype=dtype)
               for _ in range(e)]
    stack = target.stack(weights, dtype)
    r = rows
    x = random_activations(rng, (2 * r + 1, k), dtype)
    dispatches = np.array([[2, 0, r + 1, r], [0, r, 0, r + 1], [1, 1, 2 * r + 2, 0], [1, 2 * r, 2 * r + 1, 1]])
    out = target.put(poisoned((2 * r + 4, n), dtype))
    result = stack.gemm_batched(target.put(x), dispatches, out=out)
    assert result is out
    got = as64(target.get(out))
    for expert, in_row, out_row, m in dispatches:
        ref = as64(x[in_row:in_row + m]) @ weights[expert].dequantize(np.float64)
        if m:
            assert rel_error(got[out_row:out_row + m], ref) < REL_TOL[dtype]
    assert np.all(np.isnan(got[[2 * r + 2, 2 * r + 3]])), "rows no dispatch names must stay untouched"


def test_gemm_batched_returns_a_new_array_of_the_callers_type(rng, target):
    dtype = target.dtypes[-1]
    weights = [random_weight(rng, 64, 32, group_size=32, dtype=dtype) for _ in range(2)]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (3, 64), dtype)
    y = target.get(stack.gemm_batched(target.put(x), [[1, 0, 0, 3]]))
    assert y.shape == (3, 32) and y.dtype == NUMPY_DTYPES[dtype]
    assert rel_error(y, as64(x) @ weights[1].dequantize(np.float64)) < REL_TOL[dtype]


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("with_out", [True, False])
def test_gemm_batched_takes_dispatches_from_the_targets_library(rng, target, index_dtype, with_out):
    """Dispatches as the caller's array (device-resident on a GPU target): read
    by the kernels, with the host reading them only to size a new result."""
    dtype = target.dtypes[-1]
    e, k, n = 3, 128, 64
    weights = [random_weight(rng, k, n, group_size=32, dtype=dtype) for _ in range(e)]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (40, k), dtype)
    dispatches = np.array([[2, 0, 3, 20], [0, 20, 23, 1], [1, 21, 24, 19], [0, 5, 0, 0]], index_dtype)
    out = target.put(poisoned((45, n), dtype)) if with_out else None
    got = as64(target.get(stack.gemm_batched(target.put(x), target.put(dispatches), out=out)))
    assert got.shape == ((45, n) if with_out else (43, n))
    for expert, in_row, out_row, m in dispatches:
        ref = as64(x[in_row:in_row + m]) @ weights[expert].dequantize(np.float64)
        if m:
            assert rel_error(got[out_row:out_row + m], ref) < REL_TOL[dtype]
    unwritten = got[:3]
    assert np.all(np.isnan(unwritten)) if with_out else np.all(unwritten == 0), \
        "rows no dispatch names: untouched in out=, zero in a new result"


def test_float32_output_skips_the_16_bit_rounding(rng, target):
    # GPU kernels round each dequantized weight to float16 (about 1.5e-4 here),
    # so no fixed bound tells a float32 output from a float16 one; a float32
    # output must be closer to float64 than the same stack's float16 output.
    weights = [random_weight(rng, 512, 64, dtype="float16")]
    stack = target.stack(weights, "float16")
    x = random_activations(rng, (8, 512), "float16")
    ref = as64(x) @ weights[0].dequantize(np.float64)
    out32 = target.put(poisoned((8, 64), "float32"))
    stack.gemm_batched(target.put(x), [[0, 0, 0, 8]], out=out32)
    assert target.get(out32).dtype == np.float32
    out16 = stack.gemm_batched(target.put(x), [[0, 0, 0, 8]])
    assert rel_error(target.get(out32), ref) < min(rel_error(target.get(out16), ref), 1e-3)


@pytest.mark.parametrize("with_weights", [False, True])
# Every CUDA tile height, as for gemm_batched (48: two 32-row chunks).
@pytest.mark.parametrize("block_size, m", [(4, 11), (8, 30), (16, 40), (32, 70), (48, 70), (64, 150), (128, 300)])
def test_gemm_routed_matches_float64(rng, target, with_weights, block_size, m):
    dtype = target.dtypes[-1]
    e, k, n, top_k = 6, 128, 64, 2
    weights = [random_weight(rng, k, n, group_size=64, dtype=dtype) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (m, k), dtype)
    ids = rng.integers(0, e, (m, top_k)).astype(np.int32)
    ids[3, 1] = -1  # dropped pairs: their output rows stay untouched
    ids[7, 0] = e
    tw = rng.random((m, top_k)).astype(np.float32)
    routing = fm.moe_align_block_size(target.put(ids), block_size, e)
    out = target.put(poisoned((m * top_k, n), dtype))
    stack.gemm_routed(target.put(x), routing, topk_weights=target.put(tw) if with_weights else None, out=out)
    got = as64(target.get(out))
    for p in range(m * top_k):
        t, j = divmod(p, top_k)
        if not 0 <= ids[t, j] < e:
            assert np.all(np.isnan(got[p]))
            continue
        ref = as64(x[t]) @ dense[ids[t, j]] * (tw[t, j] if with_weights else 1.0)
        assert rel_error(got[p], ref) < REL_TOL[dtype]


@pytest.mark.parametrize("with_weights", [False, True])
# half 128: the CPU's gated epilogue (whole 64-column blocks) and the CUDA
# 8-row tiles' (blocks of 4; larger blocks take the host's activation); half
# 32: the host's activation after the GEMM.
@pytest.mark.parametrize("half", [32, 128])
@pytest.mark.parametrize("block_size, m", [(4, 11), (16, 40), (128, 300)])
@pytest.mark.parametrize("given_out", [False, True])
def test_gated_routed_gemm_matches_float64(rng, target, with_weights, half, block_size, m, given_out):
    """gemm_routed(activation="silu"): silu(gate) * up of the routed GEMM, in the
    backend's epilogue (ABI 1.3) or after it."""
    dtype = target.dtypes[-1]
    e, k, top_k = 5, 128, 2
    weights = [random_weight(rng, k, 2 * half, group_size=64, dtype=dtype) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (m, k), dtype)
    ids = rng.integers(0, e, (m, top_k)).astype(np.int32)
    ids[3, 1] = -1  # dropped pairs
    ids[7, 0] = e
    # Not near 0: weighted twice, the product would underflow the compute dtype.
    tw = rng.uniform(0.25, 1.0, (m, top_k)).astype(np.float32)
    routing = fm.moe_align_block_size(target.put(ids), block_size, e)
    out = target.put(poisoned((m * top_k, half), dtype)) if given_out else None
    result = stack.gemm_routed(target.put(x), routing, topk_weights=target.put(tw) if with_weights else None,
                               activation="silu", out=out)
    assert (result is out) if given_out else target.get(result).shape == (m * top_k, half)
    got = as64(target.get(result))
    for p in range(m * top_k):
        t, j = divmod(p, top_k)
        if not 0 <= ids[t, j] < e:
            # Untouched (the gated epilogue), or silu(0) * 0 (the host's activation over a zeroed y).
            untouched = given_out and np.all(np.isnan(got[p]))
            assert untouched or np.all(got[p] == 0), f"pair {p} (expert {ids[t, j]}) was written"
            continue
        y = as64(x[t]) @ dense[ids[t, j]] * (tw[t, j] if with_weights else 1.0)
        assert rel_error(got[p], silu_product(y)) < 2 * REL_TOL[dtype]


@pytest.mark.parametrize("half", [32, 128])
def test_gated_pair_routed_gemm_matches_float64(rng, target, half):
    """The layer's one-token call: pair routing with the gated output and no
    `out` (the backend writes the product or queues nothing)."""
    from ferrum_moe.arrays import import_array, import_output

    dtype = target.dtypes[-1]
    e, k, top_k = 6, 128, 4
    weights = [random_weight(rng, k, 2 * half, group_size=64, dtype=dtype) for _ in range(e)]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (1, k), dtype)
    ids = rng.permutation(e)[:top_k].reshape(1, top_k).astype(np.int32)
    tw = rng.uniform(0.25, 1.0, (1, top_k)).astype(np.float32)
    gated = target.put(poisoned((top_k, half), dtype))
    written = stack._core.gemm_routed_pairs(import_array(target.put(x), "x"), import_array(target.put(ids), "topk_ids"),
                                            e, None, import_array(target.put(tw), "topk_weights"), None,
                                            gated_out=import_output(gated, "gated_out"))
    got = as64(target.get(gated))
    if target.backend == "cpu":
        assert written == (half % 64 == 0), "the CPU's gated epilogue takes whole 64-column blocks"
    if not written:
        assert np.all(np.isnan(got)), "a backend that did not write the gated output queued work"
        return
    for j in range(top_k):
        y = as64(x[0]) @ weights[ids[0, j]].dequantize(np.float64) * tw[0, j]
        assert rel_error(got[j], silu_product(y)) < 2 * REL_TOL[dtype]


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("with_map", [False, True])
@pytest.mark.parametrize("m", [1, 9])
# 6 experts: pairs enough for experts to repeat (CUDA groups them); 64: each pair its own tile row there.
@pytest.mark.parametrize("e", [6, 64])
def test_pair_routed_gemm_matches_float64(rng, target, index_dtype, with_map, m, e):
    """gemm_routed's pair routing (ABI 1.2; what the layer runs for one token):
    every (token, k) pair its own block, its expert read from topk_ids through
    expert_map; ids outside [0, num_experts) and non-local ones are skipped."""
    from ferrum_moe.arrays import import_array, import_output

    dtype = target.dtypes[-1]
    n_global, k, n, top_k = e + 4, 128, 64, 3
    weights = [random_weight(rng, k, n, group_size=64, dtype=dtype) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = target.stack(weights, dtype)
    expert_map = np.full(n_global, -1, np.int32)
    expert_map[rng.permutation(n_global)[:e]] = np.arange(e)
    if not with_map:
        expert_map = None
    x = random_activations(rng, (m, k), dtype)
    ids = rng.integers(0, n_global if with_map else e, (m, top_k)).astype(index_dtype)
    ids[0, 0] = -1  # skipped: out of range, its row stays as it was
    ids[-1, -1] = n_global + 5
    tw = rng.random((m, top_k)).astype(np.float32)
    out = target.put(poisoned((m * top_k, n), dtype))
    stack._core.gemm_routed_pairs(import_array(target.put(x), "x"), import_array(target.put(ids), "topk_ids"),
                                  n_global if with_map else e,
                                  None if expert_map is None else import_array(target.put(expert_map), "expert_map"),
                                  import_array(target.put(tw), "topk_weights"), import_output(out, "out"))
    got = as64(target.get(out))
    for p in range(m * top_k):
        t, j = divmod(p, top_k)
        g = int(ids[t, j])
        local = (expert_map[g] if expert_map is not None else g) if 0 <= g < (n_global if with_map else e) else -1
        if local < 0:
            assert np.all(np.isnan(got[p])), f"pair {p} (id {g}) was written"
            continue
        assert rel_error(got[p], as64(x[t]) @ dense[local] * tw[t, j]) < REL_TOL[dtype]


def _assert_align_is_its_definition(ids, block_size, e, got_sorted, got_experts, got_total):
    """The align outputs as read back: the pairs and blocks reference_align
    gives, the sentinel and -1 past them."""
    sorted_ids, expert_ids, total = reference_align(ids, block_size, e)
    assert got_total == total
    assert got_sorted[:total].tolist() == sorted_ids
    assert got_experts[:total // block_size].tolist() == expert_ids
    assert np.all(got_sorted[total:] == ids.size) and np.all(got_experts[total // block_size:] == -1)


# CUDA: m x top_k from 1 to 2,048 pairs is one CTA, 2,049 (m = 2049, top-1) two chunks; one expert's ids
# take no ballot of their bits.
@pytest.mark.parametrize("m", [1, 3, 256, 2049, 2256])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("e", [1, 8, 128, 257])
@pytest.mark.parametrize("block_size", [16, 64])
def test_align_matches_its_definition(rng, target, m, top_k, e, block_size):
    ids = rng.integers(-1, e + 1, (m, top_k)).astype(np.int64)  # includes -1 and e: dropped
    r = fm.moe_align_block_size(target.put(ids), block_size, e)
    assert r.top_k == top_k and r.num_tokens == m and r.block_size == block_size
    got_sorted, got_experts = target.get(r.sorted_token_ids), target.get(r.expert_ids)
    _assert_align_is_its_definition(ids, block_size, e, got_sorted, got_experts,
                                    int(target.get(r.num_tokens_post_padded)[0]))
    padded, blocks = fm.routing_buffer_sizes(m, top_k, e, block_size)
    assert len(got_sorted) == padded and len(got_experts) == blocks


@pytest.mark.parametrize("m", [200, 2500, 4500])  # CUDA: one CTA; a chunk per CTA; past 16 chunks
def test_align_rewrites_every_position_of_reused_buffers(rng, target, m):
    """A layer aligns into the same buffers at every call: each position a call
    returns (pairs, segment padding, the tail) is its own, whatever pair ids an
    earlier, larger call left there."""
    e, top_k, block_size = 64, 8, 16
    ws = _Workspace()

    def align(ids):  # into ws's buffers, as a layer's call does
        like = target.put(ids.astype(np.int32))
        ids_t = import_array(like, "topk_ids")
        buffers = _align(resolve("auto", tuple(ids_t.device)), ids_t, block_size, e, None, stream_handle(None), ws)
        return [target.get(to_caller(t, like)) for t in buffers]

    align(rng.integers(0, e, (5000, top_k)))  # leaves pair ids in every position
    ids = rng.integers(-1, e + 1, (m, top_k))
    got_sorted, got_experts, got_total = align(ids)
    _assert_align_is_its_definition(ids, block_size, e, got_sorted, got_experts, int(got_total[0]))


@pytest.mark.parametrize("m", [40, 1000])  # one CTA; a chunk per CTA (CUDA)
def test_align_with_an_expert_map_keeps_local_experts_only(rng, target, m):
    e, top_k = 16, 4
    expert_map = np.full(e, -1, np.int32)
    expert_map[[3, 5, 8, 13]] = [0, 1, 2, 3]
    ids = rng.integers(0, e, (m, top_k)).astype(np.int32)
    r = fm.moe_align_block_size(target.put(ids), 16, e, expert_map=target.put(expert_map))
    sorted_ids, expert_ids, total = reference_align(ids, 16, e, expert_map)
    assert int(target.get(r.num_tokens_post_padded)[0]) == total
    assert target.get(r.sorted_token_ids)[:total].tolist() == sorted_ids
    assert target.get(r.expert_ids)[:total // 16].tolist() == expert_ids


@pytest.mark.parametrize("m", [300, 3000])  # CUDA: one CTA; a chunk per CTA
def test_align_with_no_local_expert_returns_only_padding(rng, target, m):
    """A rank whose map keeps none of the experts: every pair dropped, nothing
    to pad, every position the sentinel and every block -1."""
    e, top_k = 16, 4
    ids = rng.integers(0, e, (m, top_k)).astype(np.int32)
    r = fm.moe_align_block_size(target.put(ids), 16, e, expert_map=target.put(np.full(e, -1, np.int32)))
    assert int(target.get(r.num_tokens_post_padded)[0]) == 0
    assert np.all(target.get(r.sorted_token_ids) == m * top_k)
    assert np.all(target.get(r.expert_ids) == -1)


def _moe_case(rng, target, dtype, e=8, hidden=128, inter=96, group_size=32):
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=group_size, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=group_size, dtype=dtype) for _ in range(e)]
    return w13, w2, target.stack(w13, dtype), target.stack(w2, dtype)


def _routing_inputs(rng, m, e, top_k):
    logits = rng.standard_normal((m, e))
    ids = np.argsort(-logits, axis=1)[:, :top_k].astype(np.int32)
    tw = rng.random((m, top_k)).astype(np.float32)
    return tw, ids


@pytest.mark.parametrize("m", [1, 5, 64, 600])  # 600: routing blocks of 128
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fused_moe_matches_float64(rng, target, dtype, m):
    _dtype_ok(target, dtype)
    e, top_k = 8, 2
    w13, w2, s13, s2 = _moe_case(rng, target, dtype, e)
    x = random_activations(rng, (m, 128), dtype)
    tw, ids = _routing_inputs(rng, m, e, top_k)
    out = target.put(poisoned((m, 128), dtype))
    assert fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), out=out) is out
    assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]


# 3, 32 and 40 tokens of top-2 over 8 experts: experts repeat, each pair its own block.
@pytest.mark.parametrize("m", [3, 32, 40])
@pytest.mark.parametrize("with_map", [False, True])
def test_pair_routing_at_any_token_count_matches_float64(rng, target, monkeypatch, m, with_map):
    """block_size=0 (routing.PAIR_ROUTING): no align at any token count, each
    pair routed by the GEMMs from topk_ids; invalid and non-local ids dropped."""
    from ferrum_moe import moe as moe_module

    blocks = []  # the routing block of each layer call the core ran
    real_layer = moe_module._core.moe_layer
    monkeypatch.setattr(moe_module._core, "moe_layer", lambda *a: blocks.append(a[8]) or real_layer(*a))
    dtype = target.dtypes[-1]
    e, top_k = 8, 2
    w13, w2, s13, s2 = _moe_case(rng, target, dtype, e)
    x = random_activations(rng, (m, 128), dtype)
    tw, ids = _routing_inputs(rng, m, e, top_k)
    ids[1, 0], ids[2, 1] = -1, e + 3  # dropped
    kw, ref_kw = {}, {}
    if with_map:  # global ids 0..e-1 onto local ones, two of them not local
        expert_map = rng.permutation(e).astype(np.int32)
        expert_map[expert_map >= e - 2] = -1
        kw = dict(expert_map=target.put(expert_map))
        ref_kw = dict(expert_map=expert_map, num_experts=e)
    ref = reference_moe(x, w13, w2, tw, ids, **ref_kw)
    out = target.put(poisoned((m, 128), dtype))
    assert fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), out=out, block_size=0, **kw) is out
    assert rel_error(target.get(out), ref) < REL_TOL[dtype]
    layer = fm.MoE(s13, s2, top_k=top_k, block_size=fm.routing.PAIR_ROUTING, **kw)
    for _ in range(2):  # the layer's kept buffers, twice
        got = layer(target.put(x), target.put(tw), target.put(ids))
        assert rel_error(target.get(got), ref) < REL_TOL[dtype]
    assert blocks == [0] * 3, "pair routing aligned"


@pytest.mark.parametrize("m", [1, 20])  # 1: pair routing, no align
def test_fused_moe_with_an_expert_map_drops_non_local_pairs(rng, target, m):
    dtype = target.dtypes[-1]
    n_global, top_k = 12, 3
    expert_map = np.full(n_global, -1, np.int32)
    expert_map[[1, 4, 6, 7, 10]] = np.arange(5)
    w13, w2, s13, s2 = _moe_case(rng, target, dtype, e=5)
    x = random_activations(rng, (m, 128), dtype)
    tw, ids = _routing_inputs(rng, m, n_global, top_k)
    y = fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), expert_map=target.put(expert_map))
    ref = reference_moe(x, w13, w2, tw, ids, expert_map=expert_map, num_experts=n_global)
    assert rel_error(target.get(y), ref) < REL_TOL[dtype]


@pytest.mark.parametrize("m", [1, 6])
def test_fused_moe_applies_router_weights_on_the_input(rng, target, m):
    dtype = target.dtypes[-1]
    w13, w2, s13, s2 = _moe_case(rng, target, dtype)
    x = random_activations(rng, (m, 128), dtype)
    tw, ids = _routing_inputs(rng, m, 8, 1)
    y = fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), apply_router_weight_on_input=True)
    assert rel_error(target.get(y), reference_moe(x, w13, w2, tw, ids, on_input=True)) < REL_TOL[dtype]


def test_routing_with_every_token_on_one_expert_and_empty_experts(rng, target):
    dtype = target.dtypes[-1]
    w13, w2, s13, s2 = _moe_case(rng, target, dtype)
    m = 33
    x = random_activations(rng, (m, 128), dtype)
    ids = np.full((m, 1), 5, np.int32)
    tw = np.ones((m, 1), np.float32)
    y = fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids))
    assert rel_error(target.get(y), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]


def test_a_moe_layer_reuses_its_workspace_across_token_counts(rng, target):
    dtype = target.dtypes[-1]
    w13, w2, s13, s2 = _moe_case(rng, target, dtype)
    layer = fm.MoE(s13, s2, top_k=2)
    for m in (17, 3, 17, 1):
        x = random_activations(rng, (m, 128), dtype)
        tw, ids = _routing_inputs(rng, m, 8, 2)
        out = target.put(poisoned((m, 128), dtype))
        layer(target.put(x), target.put(tw), target.put(ids), out=out)
        assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]


def test_a_moe_layer_run_at_its_largest_token_count_allocates_nothing_at_smaller_ones(rng, target):
    """The routing buffers cover every default block: a layer warmed at M = 600
    (blocks of 128 here) keeps its buffers at M = 20 (blocks of 8, more of them)
    and at every count between (what capturing a CUDA graph per batch size needs)."""
    dtype = target.dtypes[-1]
    w13, w2, s13, s2 = _moe_case(rng, target, dtype)
    layer = fm.MoE(s13, s2, top_k=2)
    stream = fm.arrays.stream_handle(None)

    def run(m):
        x = random_activations(rng, (m, 128), dtype)
        tw, ids = _routing_inputs(rng, m, 8, 2)
        out = target.put(poisoned((m, 128), dtype))
        layer(target.put(x), target.put(tw), target.put(ids), out=out)
        assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]

    run(600)
    buffers = dict(layer._workspace(stream)._buffers)
    assert {"sorted_token_ids", "expert_ids"} <= buffers.keys()
    for m in (20, 2, 257, 64, 599, 200, 130):  # 200: blocks of 32, 21 of them against 600's 18
        run(m)
        assert {name: id(b) for name, b in layer._workspace(stream)._buffers.items()} == \
            {name: id(b) for name, b in buffers.items()}, f"a buffer was reallocated at M = {m}"


def test_a_stacks_facts_are_its_cores_and_read_only(rng, target):
    """ExpertStack reads its facts from the core once (a layer call asks for a
    dozen); they stay what the core says, and cannot be set."""
    dtype = target.dtypes[-1]
    stack = target.stack([random_weight(rng, 96, 64, group_size=32, dtype=dtype) for _ in range(3)], dtype)
    core = stack._core
    assert (stack.num_experts, stack.k, stack.n_per_expert, stack.bits, stack.group_size, stack.dtype) == \
        (3, 96, 64, 4, 32, dtype) == (core.num_experts, core.k, core.n_per_expert, core.bits, core.group_size,
                                       core.dtype)
    assert (stack.backend, stack.column_alignment, stack.resident_bytes) == \
        (core.backend.name, core.column_alignment, core.resident_bytes)
    assert stack.device == fm.discovery.device_name(tuple(core.device))
    for name in ("num_experts", "k", "dtype", "backend", "device"):
        with pytest.raises(AttributeError):
            setattr(stack, name, 1)


def test_expert_views_and_bias(rng, target):
    dtype = target.dtypes[-1]
    e, k, n = 4, 64, 128
    weights = [random_weight(rng, k, n, group_size=32, dtype=dtype) for _ in range(e)]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (5, k), dtype)
    bias = random_activations(rng, (64,), dtype)
    lin = stack.expert_linear(2 * n + 64, 64, bias=target.put(bias))
    assert (lin.in_features, lin.out_features) == (k, 64)
    ref = as64(x) @ weights[2].dequantize(np.float64)[:, 64:] + as64(bias)
    assert rel_error(target.get(lin(target.put(x))), ref) < REL_TOL[dtype]
    whole = stack.expert(3)
    assert rel_error(target.get(whole(target.put(x))), as64(x) @ weights[3].dequantize(np.float64)) < REL_TOL[dtype]


@pytest.mark.parametrize("first, count", [(1, 2), (0, 3), (2, 2)])
def test_views_may_cross_expert_boundaries(rng, target, first, count):
    """A window from the middle of one expert into the next (or over several):
    the same columns of the experts' matrices side by side, with bias."""
    dtype = target.dtypes[-1]
    e, k, n = 4, 96, 64
    weights = [random_weight(rng, k, n, group_size=32, dtype=dtype) for _ in range(e)]
    stack = target.stack(weights, dtype)
    offset = first * n + 32 if count > 1 and first else first * n
    width = count * n - (offset - first * n) - 16
    dense = np.concatenate([w.dequantize(np.float64) for w in weights], axis=1)[:, offset:offset + width]
    bias = random_activations(rng, (width,), dtype)
    lin = stack.expert_linear(offset, width, bias=target.put(bias))
    assert lin.out_features == width
    x = random_activations(rng, (6, k), dtype)
    out = target.put(poisoned((6, width), dtype))
    assert lin(target.put(x), out=out) is out
    assert rel_error(target.get(out), as64(x) @ dense + as64(bias)) < REL_TOL[dtype]
    plain = stack.expert_linear(offset, width)
    assert rel_error(target.get(plain(target.put(x))), as64(x) @ dense) < REL_TOL[dtype]


def test_linear_from_gptq_writes_out_in_place(rng, target):
    dtype = target.dtypes[0]
    w = random_weight(rng, 96, 48, group_size=32, dtype=dtype)
    lin = fm.Linear.from_gptq(w, backend=target.backend, device=target.device, dtype=dtype)
    x = random_activations(rng, (7, 96), dtype)
    out = target.put(poisoned((7, 48), dtype))
    assert lin(target.put(x), out=out) is out
    assert rel_error(target.get(out), as64(x) @ w.dequantize(np.float64)) < REL_TOL[dtype]


def test_zero_workspace_runs_between_gemms(rng, target):
    dtype = target.dtypes[-1]
    weights = [random_weight(rng, 64, 64, group_size=32, dtype=dtype) for _ in range(2)]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (2, 64), dtype)
    stack.zero_workspace()
    y = stack.gemm_batched(target.put(x), [[1, 0, 0, 2]])
    assert rel_error(target.get(y), as64(x) @ weights[1].dequantize(np.float64)) < REL_TOL[dtype]


def test_stacks_load_from_stacked_arrays(rng, target):
    dtype = target.dtypes[-1]
    weights = [random_weight(rng, 96, 64, group_size=32, sym=False, act_order=True, dtype=dtype) for _ in range(3)]
    stacked = dict(qweight=np.stack([w.qweight for w in weights]), scales=np.stack([w.scales for w in weights]),
                   qzeros=np.stack([w.qzeros for w in weights]), g_idx=np.stack([w.g_idx for w in weights]),
                   bits=4, group_size=32, sym=False)
    stack = fm.ExpertStack.from_gptq(stacked, backend=target.backend, device=target.device, dtype=dtype)
    x = random_activations(rng, (5, 96), dtype)
    y = target.get(stack.gemm_batched(target.put(x), [[2, 0, 0, 5]]))
    assert rel_error(y, as64(x) @ weights[2].dequantize(np.float64)) < REL_TOL[dtype]


def _empty(shape, dtype):
    """A zero-size array as numpy 2 exports it: every stride 0."""
    a = np.empty(shape, NUMPY_DTYPES.get(dtype, dtype))
    assert 0 in a.shape
    return a


def test_zero_token_inputs_give_empty_results_on_every_op(rng, target):
    """numpy 2 exports size-0 arrays with all-zero strides: they are contiguous,
    and M = 0 is a valid call of every operation."""
    dtype = target.dtypes[-1]
    w13, w2, s13, s2 = _moe_case(rng, target, dtype, e=4, hidden=64, inter=32)
    x = target.put(_empty((0, 64), dtype))
    ids, tw = target.put(_empty((0, 2), np.int32)), target.put(_empty((0, 2), np.float32))
    assert target.get(s13.gemm_batched(x, np.zeros((0, 4), np.int64))).shape == (0, 64)
    assert target.get(s13.gemm_batched(x, [[1, 0, 0, 0]])).shape == (0, 64)
    assert target.get(s13.gemm_batched(x, [], out=target.put(_empty((0, 64), dtype)))).shape == (0, 64)
    assert target.get(s13.expert_linear(16, 32)(x)).shape == (0, 32)
    routing = fm.moe_align_block_size(ids, 16, 4)
    assert int(target.get(routing.num_tokens_post_padded)[0]) == 0
    assert target.get(s13.gemm_routed(x, routing, topk_weights=tw)).shape == (0, 64)
    assert target.get(fm.fused_moe(x, s13, s2, tw, ids)).shape == (0, 64)
    assert target.get(fm.MoE(s13, s2, top_k=2)(x, tw, ids)).shape == (0, 64)
    assert fm.routing_buffer_sizes(0, 2, 4, 16) == (4 * 15, 4)


def test_new_results_are_zero_where_nothing_is_written(rng, target):
    """Freed heap memory of the same size is poisoned first: a new result must
    still read zero in rows no dispatch or routed pair writes."""
    dtype = target.dtypes[-1]
    weights = [random_weight(rng, 64, 32, group_size=32, dtype=dtype) for _ in range(3)]
    stack = target.stack(weights, dtype)
    x = random_activations(rng, (4, 64), dtype)
    ids = np.array([[0, -1], [1, 3], [2, 2], [-1, -1]], np.int32)  # -1 and 3 (= E) are dropped
    routing = fm.moe_align_block_size(target.put(ids), 16, 3)
    for _ in range(3):
        for shape in ((8, 32), (6, 32)):  # memory of the sizes asked for next, freed full of NaN
            garbage = stack._empty(shape, dtype, 0)
            if target.device == "cpu":
                np.from_dlpack(garbage.retyped("uint16") if dtype == "bfloat16" else garbage)[...] = \
                    np.uint16(0x7FC0) if dtype == "bfloat16" else np.nan
            else:
                import torch

                torch.from_dlpack(garbage).fill_(float("nan"))
            del garbage
        batched = as64(target.get(stack.gemm_batched(target.put(x), [[1, 0, 2, 2], [0, 2, 6, 2]])))
        assert np.all(batched[[0, 1, 4, 5]] == 0)
        assert rel_error(batched[2:4], as64(x[:2]) @ weights[1].dequantize(np.float64)) < REL_TOL[dtype]
        routed = as64(target.get(stack.gemm_routed(target.put(x), routing)))
        dropped = [1, 3, 6, 7]
        assert np.all(routed[dropped] == 0)
        kept = [p for p in range(8) if p not in dropped]
        ref = np.stack([as64(x[p // 2]) @ weights[ids.flat[p]].dequantize(np.float64) for p in kept])
        assert rel_error(routed[kept], ref) < REL_TOL[dtype]


def test_fused_moe_may_write_its_result_over_x(rng, target):
    """The layer reads x into its first GEMM before the top-k sum writes out."""
    dtype = target.dtypes[-1]
    w13, w2, s13, s2 = _moe_case(rng, target, dtype)
    x = random_activations(rng, (7, 128), dtype)
    tw, ids = _routing_inputs(rng, 7, 8, 2)
    ref = reference_moe(x, w13, w2, tw, ids)
    xt = target.put(x.copy())
    assert fm.fused_moe(xt, s13, s2, target.put(tw), target.put(ids), out=xt) is xt
    assert rel_error(target.get(xt), ref) < REL_TOL[dtype]
