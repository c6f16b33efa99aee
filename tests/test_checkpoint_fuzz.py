"""Property-based fuzzing of checkpoint files (hypothesis). Small checkpoints in
the published layouts (tests/model_dirs.py) are mutated at random:

- bytes of a shard flipped, overwritten, cut, inserted or appended anywhere
  (the length prefix, the header, the data), or a tensor's byte set to one that
  makes a float NaN, Inf or huge, an 8-bit zero point 0xFF, an index negative;
- shard headers edited as JSON (dtypes, shapes, data offsets, entries renamed,
  copied, dropped or swapped, __metadata__) and as text (not UTF-8, a byte-order
  mark, nesting past any recursion limit, numbers past Python's digit limit);
- config.json and the quantization config: wrong types, values near valid
  ones, missing keys, junk files; a key the loader reads set alone to a value
  of the wrong JSON type must be refused by name;
- the shard index pointed at missing, wrong or outside files, shards removed,
  renamed or duplicated.

Every load runs in a worker process (fuzz_worker.py) with a time limit and an
address-space limit, and must either succeed with the numbers the files hold,
or raise fm.CheckpointError naming the checkpoint's file. "The numbers the
files hold" is a float64 reference computed here from the mutated files by a
reader and a dequantizer that share no code with ferrum_moe: every expert and
the shared expert on random tokens, the router and its bias exactly. The
worker's peak resident memory during a load must stay under PEAK_RSS."""

import contextlib
import copy
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import conftest
from conftest import budget, counted
from fuzz_worker import Worker, WorkerDied
from model_dirs import AWQ_ORDER, NAMES, Quant, base_config, moe_layers, write_model

INDEX = "model.safetensors.index.json"
# A load of these checkpoints takes milliseconds and a few MB: a minute or
# 256 MiB (the worker holds about 50 after a load) means something runs away,
# far below what the sizes the fuzzing makes files claim (up to 2^64 bytes)
# would take.
TIMEOUT_S = 60
PEAK_RSS = 256 * 2**20
ADDRESS_SPACE = 4 * 2**30  # past it an allocation fails instead of taking the shared machine's memory
# Under AddressSanitizer (scripts/sanitize.sh) a process reserves terabytes of
# shadow address space and keeps freed memory in quarantine: the loads still
# run there, without the address-space limit and the peak-memory bound.
SANITIZED = os.environ.get("FERRUM_MOE_SANITIZED") == "1"
SIZES = dict(hidden=32, intermediate=32, experts=4, top_k=2, layers=2)
BASES = {  # id: (model_type, quantization, other config keys, shards, quantize_config.json beside config.json)
    "qwen3-gptq-v1-sym-sharded": ("qwen3_moe", Quant(group_size=16), {}, 2, False),
    "qwen3-gptq-v1-asym-per-column": ("qwen3_moe", Quant(sym=False, group_size=-1), {}, 1, False),
    "mixtral-awq": ("mixtral", Quant(method="awq", group_size=16), {}, 1, False),
    "qwen2-gptq-v2-int8-act-order-quantize_config": (
        "qwen2_moe", Quant(bits=8, sym=False, act_order=True, checkpoint_format="gptq_v2", group_size=16),
        {"shared_expert_intermediate_size": 24}, 2, True),
    "deepseek_v3-gptq-v1-int8-asym": ("deepseek_v3", Quant(bits=8, sym=False),
                                      {"n_group": 2, "topk_group": 1, "intermediate_size": 32}, 1, False),
}
SHARDED = sorted(name for name, case in BASES.items() if case[3] > 1)
NUMPY_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
                "F16": np.float16, "BF16": ml_dtypes.bfloat16, "U32": np.uint32, "I32": np.int32, "F32": np.float32,
                "U64": np.uint64, "I64": np.int64, "F64": np.float64}
F32 = 2.0**-24  # float32's unit roundoff


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The unmutated checkpoints, written once; the seed is fixed so that
    hypothesis replaying a failure mutates the same files."""
    root = tmp_path_factory.mktemp("bases")
    rng = np.random.default_rng(13)
    for name, (model_type, quant, extra, shards, separate) in BASES.items():
        write_model(root / name, base_config(model_type, **SIZES, **extra), quant, rng, shards=shards,
                    separate_quant_file=separate)
    return root


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=TIMEOUT_S, address_space=None if SANITIZED else ADDRESS_SPACE)
    yield w
    w.close()


@contextlib.contextmanager
def copy_of(bases, name):
    with tempfile.TemporaryDirectory(dir=bases) as scratch:
        path = Path(scratch) / name
        shutil.copytree(bases / name, path)
        yield path


@pytest.mark.skipif(SANITIZED, reason="AddressSanitizer's shadow memory and quarantine: no address-space limit, "
                                      "no per-call peak")
def test_the_worker_measures_each_calls_peak_and_stops_hangs_and_runaway_allocations():
    """The guards the fuzz tests rely on can fail: a call's peak memory is its
    own and is seen, an allocation past the address-space limit fails in the
    child, a call past the time limit is killed and the next gets a new child."""
    w = Worker(timeout=TIMEOUT_S, address_space=ADDRESS_SPACE)
    try:
        assert w.call("hold_memory", nbytes=PEAK_RSS) == ("ok", PEAK_RSS)
        assert w.peak_rss > PEAK_RSS
        assert w.call("hold_memory", nbytes=1) == ("ok", 1)
        assert w.peak_rss < PEAK_RSS / 2
        assert w.call("hold_memory", nbytes=2 * ADDRESS_SPACE)[:2] == ("raised", "MemoryError")
        w.timeout = 1  # the child is running: the call's time is the sleep's alone
        with pytest.raises(WorkerDied, match="no reply within 1 s"):
            w.call("sleep", seconds=60)
        w.timeout = TIMEOUT_S
        assert w.call("hold_memory", nbytes=1) == ("ok", 1)
    finally:
        w.close()


# ---- the reference: the files read with json and numpy, dequantized plainly --------------------

class Files:
    """The tensors of a checkpoint directory as its files say: the index's map,
    or every .safetensors file's header, then the bytes at each data_offsets."""

    def __init__(self, path: Path):
        self._parsed = {}
        index = path / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: path / shard for name, shard in weight_map.items()}
        else:
            self.where = {name: file for file in sorted(path.glob("*.safetensors")) for name in self._file(file)[0]}

    def _file(self, file):
        if file not in self._parsed:
            raw = file.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            self._parsed[file] = json.loads(raw[8:8 + n]), raw[8 + n:]
        return self._parsed[file]

    def has(self, name):
        return name in self.where

    def __getitem__(self, name):
        header, data = self._file(self.where[name])
        entry = header[name]
        begin, end = entry["data_offsets"]
        return np.frombuffer(data[begin:end], NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def quant_config(path, config):
    """(method, bits, group_size, v1) as the quantization config says, with the
    loader's documented defaults. (sym needs no reading: without qzeros, which
    only symmetric weights may lack, the zero is the midpoint.)"""
    q = config["quantization_config"] if "quantization_config" in config else \
        json.loads((path / "quantize_config.json").read_text())
    method = (q.get("quant_method") or "gptq").lower()
    if method == "awq":
        return "awq", 4, q["group_size"], False
    return method, q["bits"], q["group_size"], (q.get("checkpoint_format") or "gptq") == "gptq"


def unpack_along_rows(words, bits):
    """Codes [rows * 32/bits, columns]: row r * per + i of a column sits in bits
    [i * bits, (i + 1) * bits) of word r (model_dirs.pack_along_rows inverted)."""
    per, w = 32 // bits, words.astype(np.int64) & 0xFFFFFFFF
    codes = np.empty((w.shape[0] * per, w.shape[1]), np.int64)
    for i in range(per):
        codes[i::per] = (w >> (bits * i)) & ((1 << bits) - 1)
    return codes


def unpack_awq(words):
    """Codes [rows, 8 * words]: slot i of word j holds column 8j + AWQ_ORDER[i]."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    codes = np.empty((w.shape[0], 8 * w.shape[1]), np.int64)
    for slot, column in enumerate(AWQ_ORDER):
        codes[:, column::8] = (w >> (4 * slot)) & 0xF
    return codes


def dense(files, name, k, quant):
    """(W [k, N] float64, bias [N], M [k, N]) of quantized Linear ``name``, y = x @ W + bias.
    M is what the CPU kernels' float32 rounding scales with per weight, |W| + 2 |z s|:
    they take the zero point out of the dot product (s * sum(x q) - z s * sum(x)), so
    near the zero point their error follows |q s| + |z s|, not |W| (as in
    test_properties.magnitudes)."""
    method, bits, group_size, v1 = quant
    scales = files[f"{name}.scales"].astype(np.float64)
    groups, n = scales.shape
    if method == "awq":
        codes, zeros = unpack_awq(files[f"{name}.qweight"]), unpack_awq(files[f"{name}.qzeros"])
    else:
        codes = unpack_along_rows(files[f"{name}.qweight"], bits)[:k]
        if files.has(f"{name}.qzeros"):
            zeros = unpack_along_rows(files[f"{name}.qzeros"].T, bits)[:n].T + (1 if v1 else 0)
        else:
            zeros = np.full((groups, n), 1 << (bits - 1))
    if files.has(f"{name}.g_idx"):
        g_idx = files[f"{name}.g_idx"].astype(np.int64)
    else:
        g_idx = np.zeros(k, np.int64) if group_size == -1 else np.arange(k) // group_size
    bias = files[f"{name}.bias"].astype(np.float64) if files.has(f"{name}.bias") else np.zeros(n)
    zero_offset = np.abs(zeros[g_idx] * scales[g_idx])
    w = (codes - zeros[g_idx]) * scales[g_idx]
    return w, bias, np.abs(w) + 2 * zero_offset


def gamma(n):
    """A bound on the relative error of an n-term float32 dot product (with the
    weights' own float32 rounding), as in test_properties.py."""
    return (n + 2) * 2 * F32


def mlp_and_bound(x, gate, up, down):
    """silu(x @ G + g) * (x @ U + u) @ D + d in float64, a bound on what float32
    kernels may differ by (accumulation, the rounding of the activation
    buffer, |silu'| < 1.1), and the largest magnitude met on the way."""
    (g_w, g_b, g_m), (u_w, u_b, u_m), (d_w, d_b, d_m) = gate, up, down
    ax = np.abs(x)
    g, u = x @ g_w + g_b, x @ u_w + u_b
    g_err, u_err = gamma(x.shape[1]) * (ax @ g_m), gamma(x.shape[1]) * (ax @ u_m)
    with np.errstate(over="ignore"):  # exp(-g) of a very negative g: inf, and silu(g) = -0 as it should
        silu = g / (1 + np.exp(-g))
    h = silu * u
    h_err = 1.1 * np.abs(u) * g_err + np.abs(silu) * u_err + 1.1 * g_err * u_err + F32 * np.abs(h)
    y = h @ d_w + d_b
    y_mag = np.abs(h) @ d_m
    y_err = h_err @ np.abs(d_w) + gamma(h.shape[1]) * y_mag + F32 * np.abs(y)
    largest = max(np.max(ax @ g_m), np.max(ax @ u_m), np.max(y_mag), 0.0)
    return y, 2 * y_err, largest


def assert_within(got, ref, bound, largest, what):
    assert np.all(np.isfinite(ref)), f"{what}: the files hold NaN/Inf that reach the output, and the load accepted them"
    if largest > 1e37:
        return  # values the files may hold but float32 cannot carry: whatever comes out, nothing crashed
    err = np.abs(np.asarray(got, np.float64) - ref)
    assert np.all(err <= bound), f"{what}: error {np.max(err - bound):.3g} over its bound"


def expected_moe_layers(config):
    """The MoE layers by model_dirs' restatement of each architecture's rule,
    with the defaults of the keys a config may leave out."""
    defaults = {"decoder_sparse_step": 1, "mlp_only_layers": [], "first_k_dense_replace": 0, "moe_layer_freq": 1}
    return moe_layers({**defaults, **{k: v for k, v in config.items() if v is not None}})


def check_loaded(path, got):
    """What the worker loaded from ``path`` is what the files hold."""
    config = json.loads((path / "config.json").read_text())
    files, quant = Files(path), quant_config(path, config)
    model_type = config["model_type"]
    block, projections, shared_name, shared_gate_name = NAMES[model_type]
    hidden = config["hidden_size"]
    assert sorted(got) == expected_moe_layers(config)
    for i, layer in got.items():
        prefix = f"model.layers.{i}.{block}"
        found = {int(m.group(1)) for name in files.where
                 if (m := re.match(rf"{re.escape(prefix)}\.experts\.([0-9]+)\.", name))}
        num_experts = layer["experts"].shape[0]
        assert found == set(range(num_experts)), f"layer {i}: loaded {num_experts} experts; the files hold {found}"
        assert layer["top_k"] == config["num_experts_per_tok"]
        np.testing.assert_array_equal(layer["router"], files[f"{prefix}.gate.weight"].astype(np.float32))
        assert np.all(np.isfinite(layer["router"])), f"layer {i}: a router holding NaN/Inf was accepted"
        if model_type == "deepseek_v3":
            np.testing.assert_array_equal(layer["bias"],
                                          files[f"{prefix}.gate.e_score_correction_bias"].astype(np.float32))
            assert np.all(np.isfinite(layer["bias"])), f"layer {i}: a correction bias holding NaN/Inf was accepted"
        else:
            assert layer["bias"] is None
        x = layer["x"].astype(np.float64)
        assert x.shape[1] == hidden

        def mlp(module):
            gate, up = (dense(files, f"{module}.{p}", hidden, quant) for p in projections[:2])
            return mlp_and_bound(x, gate, up, dense(files, f"{module}.{projections[2]}", gate[0].shape[1], quant))

        for e in range(num_experts):
            assert_within(layer["experts"][e], *mlp(f"{prefix}.experts.{e}"), f"layer {i} expert {e}")
        has_shared = model_type == "qwen2_moe" or model_type.startswith("deepseek") and \
            (config.get("n_shared_experts") or 0) > 0
        assert (layer["shared"] is not None) == has_shared
        if has_shared:
            y, bound, largest = mlp(f"{prefix}.{shared_name}")
            if shared_gate_name:
                gate_w = files[f"{prefix}.{shared_gate_name}.weight"].astype(np.float64)
                logits = x @ gate_w.T
                with np.errstate(over="ignore"):
                    scale = 1 / (1 + np.exp(-logits))
                scale_err = 0.25 * gamma(hidden) * (np.abs(x) @ np.abs(gate_w.T)) + 4 * F32
                y, bound = y * scale, bound * scale + 2 * np.abs(y) * scale_err
            assert_within(layer["shared"], y, bound, largest, f"layer {i} shared expert")


def load_and_check(worker, path, test):
    """Loads ``path`` in the worker: either what loaded matches the files, or a
    CheckpointError names the checkpoint's file. Returns the message, or None."""
    reply = worker.call("load_checkpoint", path=str(path))
    assert SANITIZED or worker.peak_rss <= PEAK_RSS, f"the load held {worker.peak_rss / 2**20:.0f} MiB at its peak"
    outcomes = conftest.hypothesis_outcomes.setdefault(test, {})
    outcome = "loaded" if reply[0] == "ok" else "refused"
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if reply[0] == "ok":
        check_loaded(path, reply[1])
        return None
    assert reply[1] == "CheckpointError", reply
    message = reply[2]
    assert str(path) in message, f"the message names no file of the checkpoint: {message}"
    assert len(message) < 2000, f"a message of {len(message)} characters: {message[:300]} ... {message[-300:]}"
    return message


# ---- strategies ---------------------------------------------------------------------------------

HOSTILE_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                                                               2**64, -2**63, 10**30]), st.integers())
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), HOSTILE_INTS, st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                                               max_size=4)),
    max_leaves=10)
# JSON text no json.dumps writes, by name (hypothesis prints the names): each
# must be refused cleanly, or read for what it is, wherever it lands.
RAW_FRAGMENTS = {
    "nested lists": b"[" * 100_000 + b"]" * 100_000,  # past every recursion limit
    "nested objects": b'{"a":' * 50_000 + b"0" + b"}" * 50_000,
    "5000 digits": b"9" * 5_000,  # past Python's 4300-digit limit on int conversion
    "1e999": b"1e999", "-1e999": b"-1e999", "NaN": b"NaN", "-Infinity": b"-Infinity", "-0": b"-0",
    "1.0e1": b"1.0e1",
    "not UTF-8": b'"\xff\xfe"',
    "overlong UTF-8": b'"\xc0\xae"',
    "lone surrogate": b'"\\ud800"',  # an escape no UTF-8 text can hold
    # 200,000 dimensions of 2^64: multiplying them out takes minutes (quadratic in the digits)
    "200k huge dimensions": b"[" + b"18446744073709551616," * 199_999 + b"18446744073709551616]",
}


class Raw:
    """A value to be written as raw JSON text: RAW_FRAGMENTS[name]."""

    def __init__(self, name: str):
        self.name, self.text = name, RAW_FRAGMENTS[name]

    def __repr__(self):
        return f"Raw({self.name!r})"


def with_raw(draw, values=JSON):
    """Mostly a JSON value; sometimes raw text that json.dumps cannot write."""
    if draw(st.integers(0, 4)) == 0:
        return Raw(draw(st.sampled_from(sorted(RAW_FRAGMENTS))))
    return draw(values)


def dumps(value) -> bytes:
    """JSON bytes of ``value``, Raw parts written as their text."""
    raws = []

    def placeholder(obj):
        raws.append(obj.text)
        return f"\0raw{len(raws) - 1}\0"

    def substitute(v):
        if isinstance(v, Raw):
            return placeholder(v)
        if isinstance(v, dict):
            return {k: substitute(x) for k, x in v.items()}
        if isinstance(v, list):
            return [substitute(x) for x in v]
        return v

    text = json.dumps(substitute(value)).encode()
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\0raw{i}\0").encode(), raw)
    return text


def near(draw, value):
    """A value close to a valid one: off by one, scaled, zero, negative, or of
    another JSON type that spells the same thing."""
    if isinstance(value, bool):
        options = [not value, int(value), str(value).lower(), [value], None]
    elif isinstance(value, int):
        options = [value + 1, value - 1, 0, -1, -value, 2 * value, value * 2**32, 2**63, str(value), float(value),
                   [value], True, None]
    elif isinstance(value, float):
        options = [0.0, -value, round(value) if math.isfinite(value) else 0, float("nan"), float("inf"), str(value),
                   None]
    elif isinstance(value, str):
        options = [value.upper(), "", value + " ", value[:-1], [value], None, 1]
    elif isinstance(value, list):
        options = [[], value + value, [str(v) for v in value], [value], {}, None, 0, False]
    else:
        options = [None, [], {}, "", 0]
    return draw(st.sampled_from(options))


# ---- shard bytes ------------------------------------------------------------------------------

def tensor_spans(raw) -> list[tuple[int, int]]:
    """Where the header says each tensor's data lies in the file, while it still reads."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        entries = json.loads(raw[8:8 + n]).values()
        return [(8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]) for e in entries
                if isinstance(e, dict) and e.get("data_offsets", [0, 0])[0] < e.get("data_offsets", [0, 0])[1]]
    except (struct.error, ValueError, RecursionError, AttributeError, TypeError, KeyError, IndexError):
        return []


def mutate_bytes(draw, raw: bytearray) -> bytearray:
    """One byte-level change, in the length prefix, the header, the data, or a
    tensor's data set to a value that makes a float NaN, Inf or huge, an 8-bit
    zero point 255, an index negative (a quarter each: the header is small)."""
    spans = [s for s in tensor_spans(raw) if s[1] <= len(raw)]
    region = draw(st.sampled_from(["length", "header", "data", "tensor"]))
    if region == "tensor" and spans:
        begin, end = draw(st.sampled_from(spans))
        raw[draw(st.integers(begin, end - 1))] = draw(st.one_of(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x7C, 0xFC]),
                                                                st.integers(0, 255)))
        return raw
    if len(raw) >= 8:
        header_end = min(8 + struct.unpack("<Q", raw[:8])[0], len(raw))
        lo, hi = {"length": (0, 8), "header": (8, header_end)}.get(region, (header_end, len(raw)))
    else:
        lo, hi = 0, len(raw)
    pos = draw(st.integers(lo, hi)) if hi > lo else len(raw)
    kind = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete"]))
    if kind in ("flip", "set") and pos < len(raw):
        raw[pos] = raw[pos] ^ (1 << draw(st.integers(0, 7))) if kind == "flip" else draw(st.integers(0, 255))
    elif kind == "truncate":
        del raw[pos:]
    elif kind == "delete":
        del raw[pos:pos + draw(st.integers(1, 16))]
    else:
        insert_at = len(raw) if kind == "append" else pos
        raw[insert_at:insert_at] = draw(st.binary(min_size=1, max_size=64))
    return raw


@budget(100)
@given(data=st.data(), base=st.sampled_from(sorted(BASES)))
@counted
def test_mutated_shard_bytes_load_right_or_are_refused(data, base, bases, worker):
    files = sorted(f.name for f in (bases / base).glob("*.safetensors"))
    with copy_of(bases, base) as path:
        file = path / data.draw(st.sampled_from(files), label="file")
        raw = bytearray(file.read_bytes())
        for _ in range(data.draw(st.integers(1, 3))):
            raw = mutate_bytes(data.draw, raw)
        file.write_bytes(bytes(raw))
        load_and_check(worker, path, "test_mutated_shard_bytes_load_right_or_are_refused")


# ---- shard headers ----------------------------------------------------------------------------

DTYPE_NAMES = sorted(NUMPY_DTYPES) + ["F8_E4M3", "F8_E5M2", "F4", "I4", "", "f16", "float16", "Q4_0"]


def offsets_like(draw, offsets, header, data_len):
    """data_offsets that lie: past the end, reversed, overlapping another
    tensor's, negative, huge, of the wrong length or type."""
    others = [e["data_offsets"] for e in header.values() if isinstance(e, dict) and "data_offsets" in e]
    begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (0, 0)
    point = st.one_of(st.sampled_from([0, data_len, data_len + 1, -1, 2**63, 2**64, 10**30]),
                      st.integers(-8, 8).map(lambda d: begin + d if isinstance(begin, int) else d),
                      st.integers(-8, 8).map(lambda d: end + d if isinstance(end, int) else d), HOSTILE_INTS)
    # (a header edited down to no offsets has none to copy: sampling needs one)
    return draw(st.one_of(st.tuples(point, point).map(list), st.sampled_from(others or [[begin, end]]),
                          st.just([end, begin]), st.lists(point, max_size=3), JSON))


def shape_like(draw, shape):
    dims = shape if isinstance(shape, list) else []
    if draw(st.integers(0, 9)) == 0:
        return with_raw(draw)
    return draw(st.one_of(
        st.lists(st.one_of(st.sampled_from(dims or [1]), HOSTILE_INTS), max_size=4),
        st.just(dims[::-1]), st.just(dims + [1]), st.just(dims[1:]),
        st.just([d * 2 if isinstance(d, int) else d for d in dims]), JSON))


def edit_header(draw, header, data_len):
    names = [n for n in header if n != "__metadata__"] or ["x"]
    name = draw(st.sampled_from(names))
    entry = header.get(name)
    kind = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop field", "extra field", "entry", "drop entry",
                                 "rename", "copy", "swap offsets", "swap equal spans", "reorder", "__metadata__",
                                 "root"]))
    if kind in ("dtype", "shape", "data_offsets", "drop field", "extra field") and not isinstance(entry, dict):
        kind = "entry"
    if kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(DTYPE_NAMES), JSON)) if draw(st.integers(0, 4)) else \
            with_raw(draw)
    elif kind == "shape":
        entry["shape"] = shape_like(draw, entry.get("shape"))
    elif kind == "data_offsets":
        entry["data_offsets"] = offsets_like(draw, entry.get("data_offsets"), header, data_len)
    elif kind == "drop field":
        entry.pop(draw(st.sampled_from(sorted(entry) or ["dtype"])), None)
    elif kind == "extra field":
        entry[draw(st.text(max_size=8))] = with_raw(draw)
    elif kind == "entry":
        header[name] = with_raw(draw)
    elif kind == "drop entry":
        header.pop(name, None)
    elif kind in ("rename", "copy"):
        new = draw(st.one_of(st.sampled_from(names), st.text(max_size=12),
                             st.integers(0, len(name)).map(lambda i: name[:i] + "\udcff" + name[i + 1:]),
                             st.sampled_from([re.sub(r"layers\.[0-9]+\.", "layers." + "9" * 5000 + ".", name),
                                              name + ".", "__metadata__"])))
        header[new] = copy.deepcopy(entry) if kind == "copy" else header.pop(name, None)
    elif kind == "swap offsets":
        other = header.get(draw(st.sampled_from(names)))
        if isinstance(entry, dict) and isinstance(other, dict):
            entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
    elif kind == "swap equal spans":  # still a valid file, holding other numbers: the load must read them
        spans = {}
        for n, e in header.items():
            if isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
                spans.setdefault(str(e["data_offsets"][1] - e["data_offsets"][0]), []).append(n)
        pairs = [names for names in spans.values() if len(names) > 1]
        if pairs:
            a, b = draw(st.permutations(draw(st.sampled_from(pairs))))[:2]
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif kind == "reorder":
        order = draw(st.permutations(list(header)))
        header = {n: header[n] for n in order}
    elif kind == "__metadata__":
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=6),
                                                                max_size=3), JSON)) if draw(st.integers(0, 3)) else \
            with_raw(draw)
    else:
        return with_raw(draw)
    return header


def header_text(draw, header) -> bytes:
    """The header as JSON, sometimes with text-level damage: a byte-order mark,
    bytes after the object, padding, a NUL."""
    text = dumps(header) if not isinstance(header, Raw) else header.text
    kind = draw(st.sampled_from(["as is", "as is", "bom", "trailing junk", "spaces", "nul", "not utf-8 name"]))
    if kind == "bom":
        return b"\xef\xbb\xbf" + text
    if kind == "trailing junk":
        return text + draw(st.binary(min_size=1, max_size=8))
    if kind == "spaces":
        return text + b" " * draw(st.integers(1, 16))
    if kind == "nul":
        return text + b"\0"
    if kind == "not utf-8 name" and text.startswith(b'{"'):
        return b'{"\xff' + text[2:]
    return text


@budget(120)
@given(data=st.data(), base=st.sampled_from(sorted(BASES)))
@counted
def test_edited_shard_headers_load_right_or_are_refused(data, base, bases, worker):
    files = sorted(f.name for f in (bases / base).glob("*.safetensors"))
    with copy_of(bases, base) as path:
        file = path / data.draw(st.sampled_from(files), label="file")
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        for _ in range(data.draw(st.integers(1, 3))):
            if not isinstance(header, dict):
                break
            header = edit_header(data.draw, header, len(body))
        text = header_text(data.draw, header)
        length = len(text) + (data.draw(st.integers(-8, 8)) if data.draw(st.integers(0, 5)) == 0 else 0)
        file.write_bytes(struct.pack("<Q", max(length, 0)) + text + body)
        load_and_check(worker, path, "test_edited_shard_headers_load_right_or_are_refused")


# ---- config.json and the quantization config --------------------------------------------------

# The keys each architecture reads from config.json with the base configs (an
# alias is read only when the keys before it are missing, so only the first is
# listed) and the JSON type each must have.
COMMON_KEYS = dict(model_type="str", hidden_act="str", num_hidden_layers="int", hidden_size="int",
                     num_experts_per_tok="int")
QWEN_KEYS = dict(num_experts="int", moe_intermediate_size="int", decoder_sparse_step="int",
                   mlp_only_layers="int list", norm_topk_prob="bool")
READ_KEYS = {
    "mixtral": {**COMMON_KEYS, **dict(num_local_experts="int", intermediate_size="int")},
    "qwen3_moe": {**COMMON_KEYS, **QWEN_KEYS},
    "qwen2_moe": {**COMMON_KEYS, **QWEN_KEYS, **dict(shared_expert_intermediate_size="int")},
    "deepseek_v3": {**COMMON_KEYS, **dict(
        n_routed_experts="int", moe_intermediate_size="int", first_k_dense_replace="int", moe_layer_freq="int",
        n_shared_experts="int", scoring_func="str", topk_method="str", norm_topk_prob="bool",
        routed_scaling_factor="number", n_group="int", topk_group="int")},
}
QUANT_KEYS = {
    "gptq": dict(quant_method="str", bits="int", group_size="int", sym="bool", desc_act="bool",
                   checkpoint_format="str", modules_to_not_convert="str list"),
    "awq": dict(quant_method="str", bits="int", group_size="int", version="str", zero_point="bool",
                  modules_to_not_convert="str list"),
}
OTHER_KEYS = ["num_local_experts", "num_experts", "n_routed_experts", "intermediate_size", "moe_intermediate_size",
              "shared_expert_intermediate_size", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq",
              "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "routed_scaling_factor", "n_group",
              "topk_group", "topk_method", "scoring_func", "quantization_config"]


def is_kind(value, kind) -> bool:
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    return {"int": integer, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
            "number": lambda v: integer(v) or isinstance(v, float),
            "int list": lambda v: isinstance(v, list) and all(map(integer, v)),
            "str list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}[kind](value)


def json_file_junk(draw) -> bytes:
    """A JSON file's whole content replaced: random bytes, raw text, JSON that is
    not an object, an object with a value that is not UTF-8."""
    kind = draw(st.sampled_from(["bytes", "raw", "not an object", "not UTF-8"]))
    if kind == "bytes":
        return draw(st.binary(max_size=32))
    if kind == "raw":
        return RAW_FRAGMENTS[draw(st.sampled_from(sorted(RAW_FRAGMENTS)))]
    if kind == "not an object":
        return json.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict)))).encode()
    return b'{"model_type": "\xff"}'


@budget(120)
@given(data=st.data(), base=st.sampled_from(sorted(BASES)))
@counted
def test_edited_configs_load_right_or_are_refused(data, base, bases, worker):
    """Edits of config.json or the quantization config; a key the loader reads
    set alone to a value of the wrong JSON type must be refused by name."""
    model_type, quant, _, _, separate = BASES[base]
    with copy_of(bases, base) as path:
        config_file = path / "config.json"
        quant_file = path / "quantize_config.json" if separate else config_file
        edits = data.draw(st.integers(1, 3))
        wrong_type = None
        for _ in range(edits):
            target = data.draw(st.sampled_from(["config", "quantization", "file"]))
            if target == "file":
                file = data.draw(st.sampled_from(sorted({config_file, quant_file})))
                if data.draw(st.booleans()):
                    file.write_bytes(json_file_junk(data.draw))
                else:
                    file.unlink(missing_ok=True)
                continue
            file = config_file if target == "config" else quant_file
            try:
                whole = json.loads(file.read_bytes())
                obj = whole if target == "config" or separate else whole["quantization_config"]
            except (OSError, ValueError, RecursionError, KeyError, TypeError):
                continue  # an earlier edit broke this file
            if not isinstance(obj, dict):
                continue
            read = READ_KEYS[model_type] if target == "config" else QUANT_KEYS[quant.method]
            key = data.draw(st.sampled_from(sorted(set(obj) | set(read) | set(OTHER_KEYS if target == "config"
                                                                              else []))))
            if data.draw(st.integers(0, 5)) == 0:
                obj.pop(key, None)
            else:
                value = near(data.draw, obj[key]) if key in obj and data.draw(st.booleans()) else with_raw(data.draw)
                obj[key] = value
                if edits == 1 and key in read and value is not None and not isinstance(value, Raw) and \
                        not is_kind(value, read[key]):
                    wrong_type = key
            file.write_bytes(dumps(whole))
        message = load_and_check(worker, path, "test_edited_configs_load_right_or_are_refused")
        if wrong_type is not None:
            assert message is not None and wrong_type in message, (wrong_type, message)


# ---- the shard index ----------------------------------------------------------------------------

@budget(60)
@given(data=st.data(), base=st.sampled_from(SHARDED))
@counted
def test_edited_indexes_load_right_or_are_refused(data, base, bases, worker):
    with copy_of(bases, base) as path:
        index = path / INDEX
        shards = sorted(f.name for f in path.glob("*.safetensors"))
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["point", "drop name", "add name", "weight_map", "file", "no index",
                                              "drop shard", "rename shard", "extra shard"]))
            if kind in ("drop shard", "rename shard", "extra shard"):
                shard = path / data.draw(st.sampled_from(shards))
                if not shard.exists():
                    continue
                if kind == "drop shard":
                    shard.unlink()
                else:
                    target = path / ("extra.safetensors" if kind == "extra shard" else shard.name + ".part")
                    (shutil.copy if kind == "extra shard" else shutil.move)(shard, target)
                continue
            if kind == "no index":
                index.unlink(missing_ok=True)
                continue
            if kind == "file":
                index.write_bytes(json_file_junk(data.draw))
                continue
            try:
                doc = json.loads(index.read_bytes())
                weight_map = doc["weight_map"]
            except (OSError, ValueError, RecursionError, KeyError, TypeError):
                continue  # an earlier edit removed or broke the index
            if not isinstance(weight_map, dict):
                continue
            names = sorted(weight_map)
            if kind == "weight_map":
                doc["weight_map"] = with_raw(data.draw)
            elif kind == "drop name" and names:
                weight_map.pop(data.draw(st.sampled_from(names)))
            else:
                name = data.draw(st.sampled_from(names)) if kind == "point" and names else \
                    data.draw(st.one_of(st.text(max_size=12), st.just("model.layers.0.mlp.experts.0.up_proj.bias")))
                weight_map[name] = data.draw(st.one_of(
                    st.sampled_from(shards + ["model-00009-of-00009.safetensors", "../" + shards[0], "", ".",
                                              str(path / shards[0]), "config.json", INDEX, "sub/x.safetensors"]),
                    JSON))
            index.write_bytes(dumps(doc))
        load_and_check(worker, path, "test_edited_indexes_load_right_or_are_refused")
