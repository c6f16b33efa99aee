"""Property-based tests (hypothesis): random shapes, dtypes, layouts, byte
offsets, index values, NaN/Inf, empty inputs, experts with no tokens, hostile
dispatch rows, lying routing arrays and hand-built DLPack tensors.

Every call returns what a float64 reference computes, within a bound derived
from the problem (the magnitudes summed and each dtype's rounding), or raises
a ValueError/TypeError naming the operation and argument. Inputs that could
crash the process run in a child process (fuzz_worker.py), so a crash fails
the test that caused it. The budget per test is fixed and scaled by the
FERRUM_MOE_HYPOTHESIS profile (conftest.py); the session prints the count."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import ferrum_moe as fm
from conftest import budget, counted
from ferrum_moe.arrays import to_caller
from ferrum_moe.testing import NUMPY_DTYPES, random_weight
from fuzz_worker import Worker, guarded_output
from handmade_dlpack import Producer

DTYPES = ["float32", "float16", "bfloat16"]
DLPACK_DTYPES = {"float32": (2, 32, 1), "float16": (2, 16, 1), "bfloat16": (4, 16, 1)}
# The error of rounding one value to each dtype, and of one float32 addition.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
F32 = 2.0**-24
HOSTILE_INT64 = st.one_of(st.integers(-3, 12), st.sampled_from([-1, 2**31 - 1, 2**31, 2**32, 2**48, 2**62, 2**63 - 1,
                                                               -2**63, -2**31]),
                          st.integers(-2**63, 2**63 - 1))
HOSTILE_INT32 = st.one_of(st.integers(-3, 30), st.sampled_from([-1, 2**31 - 1, -2**31, 2**30]),
                          st.integers(-2**31, 2**31 - 1))


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


# ---- strategies -------------------------------------------------------------------------------

@st.composite
def experts(draw, max_experts=4, max_k=160, max_n=64, dtypes=DTYPES):
    """(weights, dtype, rng): E GPTQ matrices of one random format."""
    e = draw(st.integers(1, max_experts))
    k, n = draw(st.integers(1, max_k)), draw(st.integers(1, max_n))
    bits = draw(st.sampled_from([4, 8]))
    group_size = draw(st.one_of(st.sampled_from([-1, 32, 64, 128]), st.integers(1, max_k + 8)))
    sym = draw(st.booleans())
    act_order = group_size != -1 and draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights = [random_weight(rng, k, n, bits=bits, group_size=group_size, sym=sym, act_order=act_order, dtype=dtype)
               for _ in range(e)]
    return weights, dtype, rng


def activations(draw, rng, shape, dtype, specials=(np.nan, np.inf, -np.inf)):
    """Random normal values, in one input of four with a few NaN/Inf among them."""
    x = rng.standard_normal(shape)
    if x.size and specials and draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            x[tuple(int(rng.integers(s)) for s in shape)] = draw(st.sampled_from(specials))
    return x.astype(NUMPY_DTYPES[dtype])


def placed(draw, values: np.ndarray, dtype: str):
    """`values` ([M, K]) laid out as drawn: compact, with padded rows, as a window
    of a bigger array, or as a hand-built DLPack tensor with a byte offset."""
    m, k = values.shape
    kind = draw(st.sampled_from(["compact", "padded rows", "window", "byte offset"]))
    if kind == "compact":
        return values
    pad = draw(st.integers(1, 9))
    if kind == "padded rows":
        big = np.full((m, k + pad), np.nan, values.dtype)
        big[:, :k] = values
        return big[:, :k]
    if kind == "window":
        r0, c0 = draw(st.integers(0, 3)), draw(st.integers(0, pad))
        big = np.full((m + r0 + 1, k + pad), np.nan, values.dtype)
        big[r0:r0 + m, c0:c0 + k] = values
        return big[r0:r0 + m, c0:c0 + k]
    offset, stride = draw(st.integers(0, 7)), k + pad
    flat = np.full(offset + m * stride + 1, np.nan, values.dtype)
    flat[offset:offset + m * stride].reshape(m, stride)[:, :k] = values
    return Producer(flat, (m, k), strides=(stride, 1), byte_offset=offset * values.itemsize, dtype=DLPACK_DTYPES[dtype])


def as_numpy(result):
    """A result as numpy: inputs of unknown array types (the hand-built
    producers) come back as ferrum Tensors."""
    return result if isinstance(result, np.ndarray) else to_caller(result, np.empty(0))


def dispatch_rows(draw, num_experts, x_rows):
    """Valid rows with disjoint output ranges (overlapping writes have no defined order)."""
    rows, out_row = [], draw(st.integers(0, 3))
    for _ in range(draw(st.integers(0, 5))):
        in_row = draw(st.integers(0, x_rows))
        m = draw(st.integers(0, x_rows - in_row))
        rows.append([draw(st.integers(0, num_experts - 1)), in_row, out_row, m])
        out_row += m + draw(st.integers(0, 2))
    return rows


# ---- references and bounds ---------------------------------------------------------------------

def dense(weights):
    return [w.dequantize(np.float64) for w in weights]


def magnitudes(weights, dtype):
    """Per weight, what the kernels' float32 rounding scales with: |w| plus
    twice the zero offset |z s|. The CPU kernels take the zero point out of the
    dot product (s * sum(x q) - z s * sum(x)), so their rounding error follows
    |q s| + |z s| <= |w| + 2 |z s|, not |w| alone (near the zero point the two
    terms cancel). Their bfloat16 kernels read a code as the bf16 number 128 + q
    (docs/cpu-kernels.md) and take 128 + z out instead: 2 * 128 |s| more."""
    def with_codes(w, word):
        return dataclasses.replace(w, qweight=np.full_like(w.qweight, word)).dequantize(np.float64)

    out = []
    for w in weights:
        zero_offset = np.abs(with_codes(w, 0))
        mag = np.abs(w.dequantize(np.float64)) + 2 * zero_offset
        if dtype == "bfloat16":
            ones = 0x11111111 if w.bits == 4 else 0x01010101  # every code 1: one step above code 0
            mag += 2 * 128 * np.abs(with_codes(w, ones) - with_codes(w, 0))
        out.append(mag)
    return out


def assert_within(got, ref, bound, what=""):
    """Non-finite exactly where the reference is; elsewhere |got - ref| <= bound."""
    got = np.asarray(got, np.float64)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: NaN/Inf where the float64 reference has none, or not where it has"
    err = np.abs(got - ref)[finite]
    excess = err - bound[finite]
    assert np.all(excess <= 0), f"{what}: error {err[np.argmax(excess)]:.3g} over its bound {bound[finite][np.argmax(excess)]:.3g}"


def gemm_bound(x64, mag, out_dtype, scale=1.0):
    """float32 accumulation over K, times the router weight `scale` (with its
    own rounding), plus the rounding of the output; `mag` from magnitudes().
    The output's smallest subnormal is its absolute rounding step near zero,
    after the scale: it is not scaled."""
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(x64) @ mag * abs(scale)
    k = mag.shape[0]
    return ((k + 2) * 2 * F32 * magnitude + UNIT_ROUNDOFF[out_dtype] * magnitude) * (1 + 4 * F32) + \
        float(ml_dtypes.finfo(NUMPY_DTYPES[out_dtype]).smallest_subnormal)


def batched_reference(x, w64, mags, rows, height, n):
    """Rows no dispatch writes stay NaN (out=) or zero (a new result): NaN here, the caller decides."""
    ref, magnitude_rows = np.full((height, n), np.nan), []
    x64 = np.asarray(x, np.float64)
    for e, i, o, m in rows:
        if m:
            ref[o:o + m] = x64[i:i + m] @ w64[e]
            magnitude_rows.append((o, m, x64[i:i + m], mags[e]))
    return ref, magnitude_rows


def check_batched(got, x_values, weights, dtype, rows, out_dtype, untouched):
    w64 = dense(weights)
    height, n = got.shape[0], w64[0].shape[1]
    ref, parts = batched_reference(x_values, w64, magnitudes(weights, dtype), rows, height, n)
    bound = np.zeros((height, n))
    for o, m, xs, w in parts:
        bound[o:o + m] = gemm_bound(xs, w, out_dtype)
    written = np.zeros(height, bool)
    for _, _, o, m in rows:
        written[o:o + m] = True
    assert_within(got[written], ref[written], bound[written], "written rows")
    got_rest = np.asarray(got[~written], np.float64)
    assert np.all(np.isnan(got_rest)) if untouched == "nan" else np.all(got_rest == 0), \
        "rows no dispatch names must stay as they were (out=) or zero (a new result)"


# ---- valid inputs against float64 ------------------------------------------------------------

@budget(60)
@given(data=st.data(), case=experts())
@counted
def test_gemm_batched_matches_float64(data, case):
    weights, dtype, rng = case
    stack = fm.ExpertStack.from_gptq(weights, dtype=dtype)
    k, n = weights[0].k, weights[0].n
    x_rows = data.draw(st.integers(0, 12))
    x_values = activations(data.draw, rng, (x_rows, k), dtype)
    x = placed(data.draw, x_values, dtype)
    rows = dispatch_rows(data.draw, len(weights), x_rows)
    if data.draw(st.booleans()):
        got = as_numpy(stack.gemm_batched(x, np.array(rows, np.int64).reshape(-1, 4)))
        assert got.shape == (max([o + m for _, _, o, m in rows] or [0]), n)
        check_batched(got, x_values, weights, dtype, rows, dtype, untouched="zero")
    else:
        out_dtype = data.draw(st.sampled_from([dtype, "float32"]))
        height = max([o + m for _, _, o, m in rows] or [0]) + data.draw(st.integers(0, 2))
        backing, out = guarded_output(height, n + data.draw(st.integers(0, 3)), out_dtype, data.draw(st.integers(0, 2)))
        before = backing.copy()
        assert stack.gemm_batched(x, rows, out=out) is out
        check_batched(out[:, :n], x_values, weights, dtype, rows, out_dtype, untouched="nan")
        # Nothing outside out's first n columns changes: guard rows and columns, out's columns past n.
        written = np.zeros(backing.shape, bool)
        r0, c0 = divmod((out.ctypes.data - backing.ctypes.data) // backing.itemsize, backing.shape[1])
        written[r0:r0 + height, c0:c0 + n] = True
        np.testing.assert_array_equal(backing[~written].view(np.uint8), before[~written].view(np.uint8))


@budget(40)
@given(data=st.data(), case=experts(max_experts=3, max_n=48))
@counted
def test_linear_views_match_float64(data, case):
    weights, dtype, rng = case
    stack = fm.ExpertStack.from_gptq(weights, dtype=dtype)
    npe, a = stack.n_per_expert, stack.column_alignment
    stacked = len(weights) * npe
    edges = sorted({c for c in range(0, stacked + 1) if c % a == 0 or c % npe == 0})
    offset = data.draw(st.sampled_from(edges[:-1]))
    n = data.draw(st.sampled_from([c for c in edges if c > offset])) - offset
    dense_window = np.concatenate(dense(weights), axis=1)[:, offset:offset + n]
    mag_window = np.concatenate(magnitudes(weights, dtype), axis=1)[:, offset:offset + n]
    bias = activations(data.draw, rng, (n,), dtype, specials=()) if data.draw(st.booleans()) else None
    x_values = activations(data.draw, rng, (data.draw(st.integers(0, 9)), stack.k), dtype)
    got = as_numpy(stack.expert_linear(offset, n, bias=bias)(placed(data.draw, x_values, dtype)))
    x64 = x_values.astype(np.float64)
    ref = x64 @ dense_window + (0 if bias is None else bias.astype(np.float64))
    bound = gemm_bound(x64, mag_window, dtype) + (0 if bias is None else 2 * UNIT_ROUNDOFF[dtype] * np.abs(ref))
    assert_within(got, ref, bound, "Linear")


def align_reference(topk_ids, block_size, num_experts, expert_map=None):
    """moe_align_block_size by its definition: each local expert's pairs in
    order, padded to a multiple of block_size; (sorted ids, expert ids, total)."""
    flat = np.asarray(topk_ids, np.int64).reshape(-1)
    local = np.full(flat.size, -1, np.int64)
    valid = (flat >= 0) & (flat < num_experts)
    local[valid] = flat[valid] if expert_map is None else np.asarray(expert_map, np.int64)[flat[valid]]
    sorted_ids, expert_ids = [], []
    for e in np.unique(local[local >= 0]):
        pairs = np.flatnonzero(local == e).tolist()
        padded = -(-len(pairs) // block_size) * block_size
        sorted_ids += pairs + [flat.size] * (padded - len(pairs))
        expert_ids += [int(e)] * (padded // block_size)
    return sorted_ids, expert_ids, len(sorted_ids)


@budget(40)
@given(data=st.data())
@counted
def test_align_matches_its_definition(data):
    num_experts = data.draw(st.integers(1, 40))
    num_tokens, top_k = data.draw(st.integers(0, 30)), data.draw(st.integers(1, 4))
    block_size = data.draw(st.one_of(st.sampled_from([1, 16, 64]), st.integers(1, 100)))
    ids = np.array(data.draw(st.lists(st.integers(-2, num_experts + 1), min_size=num_tokens * top_k,
                                      max_size=num_tokens * top_k)), data.draw(st.sampled_from([np.int32, np.int64])))
    ids = ids.reshape(num_tokens, top_k)
    expert_map = None
    if data.draw(st.booleans()):
        expert_map = np.array(data.draw(st.lists(st.integers(-1, 2 * num_experts), min_size=num_experts,
                                                 max_size=num_experts)), np.int32)
    r = fm.moe_align_block_size(ids, block_size, num_experts, expert_map=expert_map)
    sorted_ids, expert_ids, total = align_reference(ids, block_size, num_experts, expert_map)
    assert int(r.num_tokens_post_padded[0]) == total
    assert r.sorted_token_ids[:total].tolist() == sorted_ids
    assert r.expert_ids[:total // block_size].tolist() == expert_ids
    assert np.all(r.sorted_token_ids[total:] == ids.size) and np.all(r.expert_ids[total // block_size:] == -1)


@budget(40)
@given(data=st.data(), case=experts(max_n=48))
@counted
def test_gemm_routed_matches_float64(data, case):
    weights, dtype, rng = case
    stack = fm.ExpertStack.from_gptq(weights, dtype=dtype)
    e, k, n = len(weights), weights[0].k, weights[0].n
    num_tokens, top_k = data.draw(st.integers(0, 10)), data.draw(st.integers(1, 3))
    ids = rng.integers(-1, e + 1, (num_tokens, top_k)).astype(np.int32)  # -1 and e are dropped
    routing = fm.moe_align_block_size(ids, data.draw(st.integers(1, 16)), e)
    x_values = activations(data.draw, rng, (num_tokens, k), dtype)
    tw = rng.random((num_tokens, top_k)).astype(np.float32) if data.draw(st.booleans()) else None
    fresh = data.draw(st.booleans())
    out = None if fresh else np.full((num_tokens * top_k, n), np.nan, NUMPY_DTYPES[dtype])
    got = as_numpy(stack.gemm_routed(placed(data.draw, x_values, dtype), routing, topk_weights=tw, out=out))
    w64, mags, x64 = dense(weights), magnitudes(weights, dtype), x_values.astype(np.float64)
    for p in range(num_tokens * top_k):
        t, j = divmod(p, top_k)
        if not 0 <= ids[t, j] < e:
            assert np.all(got[p] == 0) if fresh else np.all(np.isnan(got[p]))
            continue
        scale = 1.0 if tw is None else float(tw[t, j])
        ref = x64[t] @ w64[ids[t, j]] * scale
        assert_within(got[p], ref, gemm_bound(x64[t], mags[ids[t, j]], dtype, scale), f"pair {p}")


def moe_reference_and_bound(x, w13, w2, tw, ids, expert_map, n_global, on_input, dtype):
    """The layer in float64 and a bound on what the kernels may differ by:
    float32 accumulation in both GEMMs, the rounding of the [gate | up] and
    activation buffers to `dtype` (propagated through silu, |silu'| < 1.1),
    the float32 top-k sum and the output's rounding."""
    u, inter, hidden = UNIT_ROUNDOFF[dtype], w2[0].k, w2[0].n
    d13, d2, m13, m2 = dense(w13), dense(w2), magnitudes(w13, dtype), magnitudes(w2, dtype)
    x64 = x.astype(np.float64)
    ref, bound = np.zeros((x.shape[0], hidden)), np.zeros((x.shape[0], hidden))
    with np.errstate(all="ignore"):
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                g = int(ids[t, j])
                e = g if expert_map is None or not 0 <= g < n_global else int(expert_map[g])
                if not 0 <= g < n_global or e < 0:
                    continue
                w = float(tw[t, j])
                h, h_mag = x64[t] @ d13[e], np.abs(x64[t]) @ m13[e]
                if on_input:
                    h, h_mag = h * w, h_mag * abs(w)
                h_err = ((w13[0].k + 2) * 2 * F32 + u) * h_mag
                gate, up = h[:inter], h[inter:]
                silu = gate / (1 + np.exp(-gate))
                act = silu * up
                act_err = 1.1 * np.abs(up) * h_err[:inter] + np.abs(silu) * h_err[inter:] + \
                    1.1 * h_err[:inter] * h_err[inter:] + u * np.abs(act)
                y = act @ d2[e]
                y_err = act_err @ np.abs(d2[e]) + (inter + 2) * 2 * F32 * (np.abs(act) @ m2[e])
                scale = 1.0 if on_input else w
                ref[t] += scale * y
                bound[t] += abs(scale) * (y_err + ids.shape[1] * 2 * F32 * np.abs(y))
    return ref, 2 * bound + u * np.abs(ref) + float(ml_dtypes.finfo(NUMPY_DTYPES[dtype]).smallest_subnormal)


@budget(25)
@given(data=st.data())
@counted
def test_fused_moe_and_moe_layers_match_float64(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    e, hidden, inter = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 48)), data.draw(st.integers(1, 24))
    group_size = data.draw(st.sampled_from([-1, 16, 32]))
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=group_size, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=group_size, dtype=dtype) for _ in range(e)]
    s13, s2 = fm.ExpertStack.from_gptq(w13, dtype=dtype), fm.ExpertStack.from_gptq(w2, dtype=dtype)
    expert_map, n_global = None, e
    if data.draw(st.booleans()):
        n_global = data.draw(st.integers(e, e + 4))
        expert_map = np.full(n_global, -1, np.int32)
        expert_map[rng.choice(n_global, e, replace=False)] = rng.permutation(e)
    top_k = data.draw(st.integers(1, min(3, n_global)))
    on_input = data.draw(st.booleans())
    block_size = data.draw(st.one_of(st.none(), st.integers(1, 64)))
    layer = fm.MoE(s13, s2, top_k=top_k, expert_map=expert_map, apply_router_weight_on_input=on_input,
                   block_size=block_size) if data.draw(st.booleans()) else None
    for _ in range(2 if layer else 1):  # a layer's second call reuses its buffers at another size
        m = data.draw(st.integers(0, 10))
        x = activations(data.draw, rng, (m, hidden), dtype, specials=(np.nan,))
        ids = rng.integers(-1, n_global + 1, (m, top_k)).astype(data.draw(st.sampled_from([np.int32, np.int64])))
        tw = rng.random((m, top_k)).astype(np.float32)
        ref, bound = moe_reference_and_bound(x, w13, w2, tw, ids, expert_map, n_global, on_input, dtype)
        if layer:
            got = layer(placed(data.draw, x, dtype), tw, ids)
        else:
            got = fm.fused_moe(placed(data.draw, x, dtype), s13, s2, tw, ids, expert_map=expert_map,
                               apply_router_weight_on_input=on_input, block_size=block_size)
        got = as_numpy(got)
        assert got.shape == (m, hidden)
        assert_within(got, ref, bound, "MoE" if layer else "fused_moe")


# ---- hostile inputs, in the worker process ---------------------------------------------------

def _small_stack_case(draw, rng):
    e, k, n = draw(st.integers(1, 3)), draw(st.integers(1, 64)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    return [random_weight(rng, k, n, group_size=32, dtype=dtype) for _ in range(e)], dtype


@budget(60)
@given(data=st.data())
@counted
def test_hostile_dispatch_rows_are_computed_or_named(data, worker):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    weights, dtype = _small_stack_case(data.draw, rng)
    e, n = len(weights), weights[0].n
    x_rows = data.draw(st.integers(0, 6))
    x = activations(data.draw, rng, (x_rows, weights[0].k), dtype, specials=())
    rows = data.draw(st.lists(st.lists(HOSTILE_INT64, min_size=4, max_size=4), min_size=1, max_size=4))
    out = None
    if data.draw(st.booleans()):
        out = (data.draw(st.integers(0, 8)), n + data.draw(st.integers(0, 2)), data.draw(st.sampled_from([dtype, "float32"])),
               data.draw(st.integers(0, 2)))
    out_rows = -1 if out is None else out[0]

    def valid(ex, i, o, m):
        inside_out = (0 <= o <= out_rows and m <= out_rows - o) if out is not None else (0 <= o and o + m <= 2**48)
        return 0 <= ex < e and m >= 0 and 0 <= i <= x_rows and m <= x_rows - i and inside_out

    all_valid = all(valid(*r) for r in rows)
    height = max([o + m for _, _, o, m in rows] or [0])
    assume(not (all_valid and out is None and height > 4096))  # a valid request for a huge result: not hostile
    written_twice = False
    if all_valid:  # overlapping output ranges have no defined write order
        claimed = np.zeros(max(height, out_rows, 0) + 1, int)
        for _, _, o, m in rows:
            claimed[o:o + m] += 1
        written_twice = bool(np.any(claimed > 1))
    reply = worker.call("gemm_batched", weights=weights, dtype=dtype, x=x, dispatches=rows, out=out)
    if not all_valid:
        assert reply[0] == "raised" and reply[1] == "ValueError", reply
        assert reply[2].startswith(("gemm_batched: dispatches[", "dispatches: values must fit")), reply
        return
    assert reply[0] == "ok", reply
    if out is None:
        got, untouched, out_dtype = reply[1], "zero", dtype
    else:
        backing = reply[1]
        got, untouched, out_dtype = backing[1:out_rows + 1, out[3]:out[3] + n], "nan", out[2]
        guards = np.ones(backing.shape, bool)
        guards[1:out_rows + 1, out[3]:out[3] + n] = False
        assert np.all(np.isnan(backing[guards].astype(np.float64))), "written outside out"
    if not written_twice:
        check_batched(got, x, weights, dtype, [r for r in rows], out_dtype, untouched)


@budget(60)
@given(data=st.data())
@counted
def test_lying_routing_arrays_are_skipped_never_followed(data, worker):
    """Routing arrays built by hand with any int32 values and lengths: entries
    out of range are skipped (plugin.h), everything else is computed, nothing
    outside out is written; wrong lengths are named."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    weights, dtype = _small_stack_case(data.draw, rng)
    e, k, n = len(weights), weights[0].k, weights[0].n
    num_tokens, top_k, block_size = data.draw(st.integers(0, 6)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8))
    pairs = num_tokens * top_k
    sorted_ids = np.array(data.draw(st.lists(HOSTILE_INT32, max_size=24)), np.int32)
    expert_ids = np.array(data.draw(st.lists(st.one_of(st.integers(-2, e + 1), HOSTILE_INT32), max_size=12)), np.int32)
    post = np.array(data.draw(st.lists(HOSTILE_INT32, min_size=1, max_size=1 if data.draw(st.integers(0, 9)) else 2)),
                    np.int32)
    x = activations(data.draw, rng, (num_tokens, k), dtype, specials=())
    tw = rng.random((num_tokens, top_k)).astype(np.float32) if data.draw(st.booleans()) else None
    reply = worker.call("gemm_routed", weights=weights, dtype=dtype, x=x, sorted_token_ids=sorted_ids,
                        expert_ids=expert_ids, num_tokens_post_padded=post, block_size=block_size, top_k=top_k,
                        topk_weights=tw, out=(pairs, n, dtype, 0))
    if len(expert_ids) < -(-len(sorted_ids) // block_size) or len(post) != 1:
        assert reply[0] == "raised" and reply[1] == "ValueError" and reply[2].startswith("gemm_routed: "), reply
        return
    assert reply[0] == "ok", reply
    backing = reply[1]
    assert np.all(np.isnan(backing[[0, -1]].astype(np.float64))) and np.all(np.isnan(backing[:, -1].astype(np.float64)))
    got = backing[1:pairs + 1, :n].astype(np.float64)
    writers = {}
    for p in range(min(max(int(post[0]), 0), len(sorted_ids))):  # the contract, as a plain loop
        b = p // block_size
        if b >= min(len(expert_ids), pairs):
            break
        ex, pair = int(expert_ids[b]), int(sorted_ids[p])
        if 0 <= ex < e and 0 <= pair < pairs:
            writers.setdefault(pair, []).append(ex)
    w64, mags, x64 = dense(weights), magnitudes(weights, dtype), x.astype(np.float64)
    for pair in range(pairs):
        if pair not in writers:
            assert np.all(np.isnan(got[pair])), f"pair {pair} was written though no valid entry names it"
            continue
        scale = 1.0 if tw is None else float(tw.flat[pair])
        t = pair // top_k
        candidates = [(x64[t] @ w64[ex] * scale, gemm_bound(x64[t], mags[ex], dtype) * (1 + 4 * F32)) for ex in
                      set(writers[pair])]
        assert any(np.all(np.abs(got[pair] - ref) <= bound) for ref, bound in candidates), f"pair {pair}"


@budget(40)
@given(data=st.data())
@counted
def test_hostile_align_inputs_are_computed_or_named(data, worker):
    num_experts = data.draw(st.one_of(st.integers(1, 12), st.sampled_from([2**31 - 1, 2**31, 2**40, 0, -1])))
    num_tokens, top_k = data.draw(st.integers(0, 8)), data.draw(st.integers(1, 3))
    block_size = data.draw(st.one_of(st.integers(1, 20), st.sampled_from([65536, 65537, 0])))
    ids = np.array(data.draw(st.lists(HOSTILE_INT32, min_size=num_tokens * top_k, max_size=num_tokens * top_k)),
                   np.int32).reshape(num_tokens, top_k)
    expert_map = None
    if data.draw(st.booleans()) and 1 <= num_experts <= 12:
        expert_map = np.array(data.draw(st.lists(st.one_of(st.integers(-1, 12), HOSTILE_INT32), min_size=num_experts,
                                                 max_size=num_experts)), np.int32)
    num_local = num_experts if expert_map is None else int(expert_map.max(initial=-1)) + 1
    padded = ids.size + num_local * (block_size - 1)
    refused = not 1 <= num_experts <= 2**31 - 1 or not 1 <= block_size <= 65536 or \
        (expert_map is not None and expert_map.min(initial=0) < -1) or padded > 2**31 - 1
    # Buffers sized for every local expert's worst-case padding (vLLM's contract) may be
    # valid and still gigabytes: such a request is large, not hostile.
    assume(refused or padded <= 2**24)
    reply = worker.call("moe_align_block_size", topk_ids=ids, block_size=block_size, num_experts=num_experts,
                        expert_map=expert_map)
    if refused:
        assert reply[0] == "raised" and reply[1] == "ValueError", reply
        assert reply[2].startswith(("moe_align_block_size: ", "routing buffers: ")), reply
        return
    assert reply[0] == "ok", reply
    sorted_ids, expert_ids, post = reply[1]
    ref_sorted, ref_experts, total = align_reference(ids, block_size, num_experts, expert_map)
    assert int(post[0]) == total and sorted_ids[:total].tolist() == ref_sorted
    assert expert_ids[:total // block_size].tolist() == ref_experts


@st.composite
def dlpack_metadata(draw):
    """Metadata over a 64-element buffer: mostly plausible, sometimes hostile."""
    ndim = draw(st.one_of(st.integers(0, 3), st.sampled_from([-1, 33, 100])))
    dims = st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**31, 2**48 + 1, 2**62, 2**63 - 1]))
    shape = draw(st.lists(dims, min_size=max(ndim, 0), max_size=max(ndim, 0))) if 0 <= ndim <= 3 else [2] * 3
    strides = None
    if draw(st.booleans()) and 0 <= ndim <= 3:
        strides = draw(st.lists(st.one_of(st.integers(-8, 8), st.sampled_from([2**40, -2**63, 2**62])),
                                min_size=len(shape), max_size=len(shape)))
    dtype = draw(st.one_of(st.sampled_from([(2, 32, 1), (0, 32, 1), (1, 8, 1), (2, 16, 1)]),
                           st.sampled_from([(2, 0, 1), (2, 32, 0)])))
    return dict(shape=tuple(shape), ndim=ndim, strides=None if strides is None else tuple(strides),
                byte_offset=draw(st.integers(0, 16)) * (dtype[1] // 8 or 1), dtype=dtype,
                null_shape=draw(st.integers(0, 9)) == 0), draw(st.integers(0, 9)) == 0


def _refused(meta, null_data):
    """Whether the core must refuse this metadata (tensor.cpp's import checks, in plain Python)."""
    ndim, shape, strides = meta["ndim"], meta["shape"], meta["strides"]
    code, bits, lanes = meta["dtype"]
    if not 0 <= ndim <= 32 or (ndim > 0 and meta["null_shape"]) or bits == 0 or lanes == 0:
        return True
    item = (bits * lanes + 7) // 8
    if any(d < 0 or d > 2**48 for d in shape):
        return True
    empty = 0 in shape
    if item * int(np.prod([int(d) for d in shape if d], dtype=object)) > 2**48:  # zeros left out
        return True
    if strides is not None and not empty:
        span = 0
        for d, s in zip(shape, strides):
            if d > 1:
                reach = abs(s) * (d - 1) * item
                if s == -2**63 or reach > 2**48 - span:
                    return True
                span += reach
    return null_data and not empty


@budget(80)
@given(case=dlpack_metadata())
@counted
def test_hand_built_dlpack_tensors_are_read_exactly_or_refused(case, worker):
    meta, null_data = case
    item = {8: 1, 16: 2, 32: 4}.get(meta["dtype"][1], 4)
    buffer = np.arange(64, dtype={(2, 32): np.float32, (0, 32): np.int32, (1, 8): np.uint8,
                                  (2, 16): np.float16}.get(meta["dtype"][:2], np.float32))
    refused = _refused(meta, null_data)
    shape, strides = meta["shape"], meta["strides"]
    if not refused and 0 not in shape:
        # Accepted metadata must describe memory inside the buffer, or the producer lies
        # about its memory (which no consumer can detect): such inputs are not generated.
        steps = strides if strides is not None else [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        lo = sum(min(0, s * (d - 1)) for d, s in zip(shape, steps))
        hi = sum(max(0, s * (d - 1)) for d, s in zip(shape, steps))
        base = meta["byte_offset"] // item
        assume(not null_data and base + lo >= 0 and base + hi < buffer.size)
    reply = worker.call("import_handmade", buffer=None if null_data else buffer, metadata=meta)
    if refused:
        assert reply[0] == "raised" and reply[1] == "ValueError" and reply[2].startswith("x: DLPack tensor: "), reply
        return
    assert reply[0] == "ok", reply
    got, got_shape, _ = reply[1]
    assert got_shape == tuple(shape)
    if got is not None and 0 not in shape:
        base = meta["byte_offset"] // item
        steps = strides if strides is not None else [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        index = base + sum(np.arange(d).reshape([-1 if a == i else 1 for a in range(len(shape))]) * s
                           for i, (d, s) in enumerate(zip(shape, steps)))
        np.testing.assert_array_equal(got, buffer[index] if len(shape) else buffer[base])


@budget(60)
@given(data=st.data())
@counted
def test_out_is_refused_exactly_when_it_shares_memory_with_x(data):
    """x and out as windows of one buffer (any rows, columns, row steps):
    refused exactly when numpy says they share an element; computed right otherwise."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k, n = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 20))
    weights = [random_weight(rng, k, n, group_size=-1, dtype="float32")]
    stack = fm.ExpertStack.from_gptq(weights, dtype="float32")
    m = data.draw(st.integers(1, 6))
    width = data.draw(st.integers(max(k, n), 48))
    buf = rng.standard_normal((data.draw(st.integers(2 * m, 3 * m + 4)), width)).astype(np.float32)

    def window(cols):
        step = data.draw(st.integers(1, 2))
        r0 = data.draw(st.integers(0, buf.shape[0] - (m - 1) * step - 1))
        c0 = data.draw(st.integers(0, width - cols))
        return buf[r0:r0 + (m - 1) * step + 1:step, c0:c0 + cols]

    x, out = window(k), window(n)
    expected = x.astype(np.float64) @ weights[0].dequantize(np.float64)
    if np.shares_memory(x, out, max_work=None):
        before = buf.copy()
        with pytest.raises(ValueError, match="gemm_batched: out overlaps x in memory"):
            stack.gemm_batched(x, [[0, 0, 0, m]], out=out)
        np.testing.assert_array_equal(buf, before)
    else:
        stack.gemm_batched(x, [[0, 0, 0, m]], out=out)
        assert_within(out, expected, gemm_bound(x.astype(np.float64), magnitudes(weights, "float32")[0], "float32"))
