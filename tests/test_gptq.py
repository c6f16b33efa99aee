"""GPTQ and AWQ formats on the host: packing, quantization, dequantization."""

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe import awq, gptq

from conftest import random_weight


def test_a_word_unpacks_low_bits_first():
    word = np.array([[np.uint32(0x87654321).view(np.int32)]])
    assert gptq.unpack(word, 4, 8)[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert gptq.unpack(word, 8, 4)[:, 0].tolist() == [0x21, 0x43, 0x65, 0x87]


def test_packing_the_codes_1_to_8_gives_0x87654321():
    assert gptq.pack(np.arange(1, 9).reshape(8, 1), 4).view(np.uint32)[0, 0] == 0x87654321


@pytest.mark.parametrize("bits, word", [(4, 0x77777777), (8, 0x7F7F7F7F)])
def test_v1_symmetric_zeros_store_zero_minus_one(rng, bits, word):
    w = gptq.quantize(rng.standard_normal((64, 16)), bits, 32, sym=True)
    assert np.all(w.qzeros.view(np.uint32) == word)
    assert np.all(w.zeros() == 1 << (bits - 1))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 33, 256])
def test_pack_unpack_round_trip_along_either_axis(rng, bits, k):
    q = rng.integers(0, 1 << bits, (k, 5))
    np.testing.assert_array_equal(gptq.unpack(gptq.pack(q, bits), bits, k), q)
    np.testing.assert_array_equal(gptq.unpack(gptq.pack(q.T, bits, axis=1), bits, k, axis=1), q.T)


def test_pack_refuses_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\) for 4-bit; got \[0, 16\]"):
        gptq.pack(np.array([[0], [16]]), 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_quantize_rounds_to_the_nearest_level(rng, bits, group_size, sym, fmt):
    k, n = 200, 24  # 200 = a partial last group for 32, 64 and 128
    w = rng.standard_normal((k, n))
    q = gptq.quantize(w, bits, group_size, sym, checkpoint_format=fmt, scale_dtype=np.float32)
    assert q.num_groups == (1 if group_size == -1 else -(-k // group_size))
    step = q.scales.astype(np.float64)[q.group_index()]
    err = np.abs(q.dequantize(np.float64) - w)
    assert np.all(err <= step * (0.5 + 1e-6))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("side", ["positive", "negative", "constant", "zero", "mixed"])
def test_asymmetric_rtn_keeps_one_sided_groups_within_half_a_step(rng, bits, group_size, fmt, side):
    """v1 cannot store a zero point of 0: a group with no negative weight must
    still dequantize within half a step. Constant groups near 1e-3 have float16
    subnormal scales, whose rounding must not clip the extreme code."""
    k, n = 160, 16
    w = {"positive": lambda: rng.random((k, n)) + 0.1, "negative": lambda: -(rng.random((k, n)) + 0.1),
         "constant": lambda: np.full((k, n), rng.standard_normal()), "zero": lambda: np.zeros((k, n)),
         "mixed": lambda: rng.standard_normal((k, n))}[side]()
    q = gptq.quantize(w, bits, group_size, sym=False, checkpoint_format=fmt)
    step = q.scales.astype(np.float64)[q.group_index()]
    bound = step * (0.5 + 1e-9)
    assert np.all(np.abs(q.dequantize(np.float64) - w) <= bound)
    assert q.zeros().min() >= (1 if fmt == "gptq" else 0)


def test_dequantize_follows_the_formula_with_act_order(rng):
    w = random_weight(rng, 96, 8, group_size=32, sym=False, act_order=True, dtype="float32")
    assert not np.all(np.diff(w.g_idx) >= 0)  # non-monotonic
    codes, zeros = w.codes(), w.zeros()
    expected = np.array([[(codes[k, n] - zeros[w.g_idx[k], n]) * float(w.scales[w.g_idx[k], n]) for n in range(8)]
                         for k in range(96)])
    np.testing.assert_allclose(w.dequantize(np.float64), expected, rtol=0, atol=0)


def test_v1_and_v2_checkpoints_of_one_matrix_dequantize_alike(rng):
    w = rng.standard_normal((128, 16))
    v1 = gptq.quantize(w, 4, 64, sym=False, checkpoint_format="gptq_v2")
    stored_v1 = gptq.pack(v1.zeros() - 1, 4, axis=1)
    as_v1 = fm.GPTQWeight(v1.qweight, v1.scales, stored_v1, bits=4, group_size=64, sym=False, checkpoint_format="gptq")
    np.testing.assert_array_equal(as_v1.dequantize(), v1.dequantize())


def test_awq_nibble_order_is_0_2_4_6_1_3_5_7():
    word = np.array([[np.uint32(0x76543210).view(np.int32)]])  # slot i holds value i
    assert awq.unpack_awq(word)[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_awq_converts_exactly(rng):
    k, n, g = 256, 64, 128
    codes = rng.integers(0, 16, (k, n))
    zeros = rng.integers(0, 16, (k // g, n))
    scales = (rng.random((k // g, n)) + 0.5).astype(np.float16)
    w = awq.to_gptq(awq.pack_awq(codes), awq.pack_awq(zeros), scales, g)
    assert w.checkpoint_format == "gptq_v2" and not w.sym
    expected = (codes - np.repeat(zeros, g, axis=0)) * np.repeat(scales.astype(np.float64), g, axis=0)
    np.testing.assert_array_equal(w.dequantize(np.float64), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scales=np.zeros((3, 8))), r"scales must be \[num_groups=2, N=8\]; got shape \(3, 8\)"),
    (dict(qzeros=np.zeros((2, 4), np.int32)), r"qzeros must be \[2, 1\] \(packed along N\); got shape \(2, 4\)"),
    (dict(g_idx=np.full(256, 5)), r"g_idx values must be in \[0, 2\); got \[5, 5\]"),
    (dict(bits=3), "bits must be 4 or 8; got 3"),
    (dict(checkpoint_format="awq"), "checkpoint_format must be one of"),
    (dict(qweight=np.zeros((32, 8), np.float32)), "qweight must hold int32 words; got dtype float32"),
    (dict(g_idx=np.zeros(240, np.int32)),
     r"g_idx has length 240; qweight's 32 packed rows hold K in \[249, 256\]"),
    (dict(g_idx=np.zeros(256, np.float32)), "g_idx must hold integer group indices; got dtype float32"),
    (dict(group_size=2**63), r"group_size must be at most 9223372036854775807 \(any size >= K is one group\)"),
    (dict(sym=False), "qzeros is required when sym=False"),
    (dict(qzeros=np.zeros((2, 1), np.float32), sym=False), "qzeros must hold int32 words; got dtype float32"),
])
def test_bad_gptq_weights_are_named(kwargs, message):
    args = dict(qweight=np.zeros((32, 8), np.int32), scales=np.ones((2, 8), np.float16), bits=4, group_size=128)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        fm.GPTQWeight(**args)


def test_unstack_gives_views_of_each_expert(rng):
    qweight = rng.integers(-(2**31), 2**31, (3, 8, 16), dtype=np.int64).astype(np.int32)
    scales = rng.random((3, 1, 16)).astype(np.float16)
    experts = gptq.unstack(qweight, scales, bits=4, group_size=-1)
    assert len(experts) == 3 and np.shares_memory(experts[1].qweight, qweight)
    np.testing.assert_array_equal(experts[2].codes(), gptq.unpack(qweight[2], 4, 64))
    with pytest.raises(ValueError, match=r"unstack: qweight must be \[E, K/8, N\]"):
        gptq.unstack(qweight[0], scales)


def test_unpack_names_k_beyond_what_the_words_hold():
    with pytest.raises(ValueError, match=r"unpack: k=25 exceeds the 24 codes that 3 words of 4-bit codes hold"):
        gptq.unpack(np.zeros((3, 2), np.int32), 4, 25)


@pytest.mark.parametrize("value, message", [(1e6, r"w's scales must fit float16; got max\|w\| = 1e\+06"),
                                            (np.inf, r"w must be finite; got 1 inf or NaN values"),
                                            (np.nan, r"w must be finite; got 1 inf or NaN values")])
def test_quantize_names_weights_it_cannot_store(value, message):
    w = np.ones((32, 4))
    w[3, 2] = value
    with pytest.raises(ValueError, match=message):
        gptq.quantize(w, 4, 32)
