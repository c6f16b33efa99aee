"""Measured block tables (ferrum_moe/block_tables.py): the shipped ones agree
with the sweep they were written from, the lookup takes the right entry and
token count, a malformed table is refused by name, and a layer call takes the
table's block and stays exact."""

import json
import os
import pathlib
import re

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe import block_tables
from ferrum_moe import moe as moe_module
from ferrum_moe.routing import default_block_size
from conftest import TARGETS
from ferrum_moe.testing import REL_TOL, poisoned, random_activations, random_weight, reference_moe, rel_error

REPO = pathlib.Path(__file__).resolve().parents[1]
H200_TABLE = block_tables.SHIPPED / "cuda-h200.json"
H200 = "CUDA sm_90, NVIDIA H200, 132 SMs"  # the CUDA backend's description there
MIXTRAL = dict(experts=8, top_k=2, hidden=4096, inter=14336, dtype="float16", bits=4, group_size=128)
H200_SWEEP = REPO / "benchmarks" / "results-h200-2026-12-05-blocks-v52.json"
# Each shipped table, the sweeps it was written from (a later one's row replaces an earlier one's), its device
# and date.
SHIPPED_SWEEPS = [
    (H200_TABLE, [H200_SWEEP], "NVIDIA H200", "2026-12-05"),
    (block_tables.SHIPPED / "cuda-h100.json",
     [REPO / "benchmarks" / name for name in ("results-h100-2026-12-05-blocks-v46.json",
                                              "results-h100-2026-12-05-blocks-v53.json",
                                              "results-h100-2026-12-06-blocks-v57b.json",
                                              "results-h100-2026-12-06-blocks-v61b.json",
                                              "results-h100-2026-12-06-blocks-v69.json")],
     "NVIDIA H100 80GB HBM3", "2026-12-06"),
]


def _table(layers, backend="cuda", device="NVIDIA H200"):
    return {"schema": 1, "backend": backend, "device": device, "measured": "2026-12-04", "layers": layers}


def _layer(blocks, experts=8, top_k=2, hidden=4096, inter=14336, dtype="float16", bits=4, group_size=128):
    return {"experts": experts, "top_k": top_k, "hidden": hidden, "inter": inter, "dtype": dtype, "bits": bits,
            "group_size": group_size, "blocks": blocks}


@pytest.fixture
def user_tables(tmp_path, monkeypatch):
    """Writes tables to files named by FERRUM_MOE_BLOCK_TABLES (first first),
    each to a new file (the tables are read once per value of the variable)."""
    written = []

    def write(*tables):
        paths = []
        for table in tables:
            path = tmp_path / f"table{len(written)}.json"
            if isinstance(table, bytes):
                path.write_bytes(table)
            else:
                path.write_text(table if isinstance(table, str) else json.dumps(table))
            written.append(path)
            paths.append(str(path))
        monkeypatch.setenv(block_tables.ENV, os.pathsep.join(paths))
        return paths
    return write


def _small_layer(rng, target, dtype, m, e, top_k, hidden, inter):
    """Weights (GPTQ, group 32), their stacks and one call's x, topk_ids and
    topk_weights (host arrays)."""
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=32, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=32, dtype=dtype) for _ in range(e)]
    x = random_activations(rng, (m, hidden), dtype)
    ids = np.argsort(-rng.standard_normal((m, e)), axis=1)[:, :top_k].astype(np.int32)
    tw = rng.random((m, top_k)).astype(np.float32)
    return w13, w2, target.stack(w13, dtype), target.stack(w2, dtype), x, ids, tw


@pytest.fixture
def used_blocks(monkeypatch):
    """The routing block of every aligned layer call, in order."""
    used = []
    real_buffers = moe_module._routing_buffers

    def recording_buffers(core, ids, block_size, *args, **kwargs):
        used.append(block_size)
        return real_buffers(core, ids, block_size, *args, **kwargs)

    monkeypatch.setattr(moe_module, "_routing_buffers", recording_buffers)
    return used


def test_the_shipped_tables_parse():
    tables = sorted(block_tables.SHIPPED.glob("*.json"))
    assert sorted(table for table, *_ in SHIPPED_SWEEPS) == tables
    for path in tables:
        assert block_tables.read_table(path), f"{path} has no layer"


@pytest.mark.parametrize("table, sweep_paths, device, measured", SHIPPED_SWEEPS)
def test_a_shipped_table_holds_its_sweeps_fastest_block_or_the_rules_within_3_percent(table, sweep_paths, device,
                                                                                      measured):
    sweeps = [json.loads(path.read_text()) for path in sweep_paths]
    shipped = json.loads(table.read_text())
    assert {sweep["device"] for sweep in sweeps} == {shipped["device"]} == {device}
    last = {}  # (model, dtype, m) -> the row of the last sweep that timed the rule's block there
    for sweep in sweeps:
        for r in sweep["rows"]:
            times = r.get("ferrum_us_by_block_size")
            rule = default_block_size(r["m"] * r["top_k"], r["experts"]) if times else None
            if times and str(rule) in times:
                last[(r["model"], r["dtype"], r["m"])] = r
    rows = 0
    for layer in shipped["layers"]:
        for m, block in layer["blocks"]:
            times = last[(layer["model"], layer["dtype"], m)]["ferrum_us_by_block_size"]
            fastest = min(times.values())
            rule = default_block_size(m * layer["top_k"], layer["experts"])
            if times[str(rule)] <= fastest * 1.03:
                assert block == rule
            else:
                assert times[str(block)] == fastest
            rows += 1
    assert rows == len(last)


@pytest.mark.parametrize("table, sweep_paths, device, measured", SHIPPED_SWEEPS)
def test_the_writer_rewrites_a_shipped_table(monkeypatch, table, sweep_paths, device, measured):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from write_block_table import table_from_results
    sweeps = [json.loads(path.read_text()) for path in sweep_paths]
    written = table_from_results(sweeps, backend="cuda", device=None, measured=measured, source="", margin=0.03)
    assert written["device"] == device
    assert written["layers"] == json.loads(table.read_text())["layers"]
    with pytest.raises(SystemExit, match="measured on"):
        table_from_results(sweeps, backend="cuda", device="NVIDIA A100", measured="", source="", margin=0.03)


def _mixtral_row(m, times, **extra):
    """A bench_moe.py row of Mixtral's layer on the H200 with these block sizes timed (us)."""
    return dict(model="mixtral", **MIXTRAL, m=m, device="NVIDIA H200",
                ferrum_us_by_block_size={str(b): t for b, t in times.items()}, **extra)


def test_the_writer_skips_rows_that_did_not_time_the_rules_block(monkeypatch):
    """A row whose sweep left out the block the layer runs without a table says
    nothing about departing from it (Mixtral M = 32: rule 16, blocks 0 and 8
    timed, 32-row tiles unknown)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from write_block_table import table_from_results

    sweep = {"device": "NVIDIA H200", "rows": [_mixtral_row(4, {0: 90.0, 8: 100.0}),
                                               _mixtral_row(32, {0: 500.0, 8: 480.0})]}
    written = table_from_results([sweep], backend="cuda", device=None, measured="", source="", margin=0.03)
    assert written["layers"][0]["blocks"] == [[4, 0]]


def test_the_writer_leaves_act_order_rows_out(monkeypatch):
    """An act-order sweep (bench_moe.py --act-order) runs the plain stacks'
    blocks and names the same quantization: it must not write their entries."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from write_block_table import table_from_results

    sweep = {"device": "NVIDIA H200", "rows": [_mixtral_row(4, {0: 90.0, 8: 100.0}),
                                               _mixtral_row(8, {0: 90.0, 8: 200.0}, act_order=True)]}
    written = table_from_results([sweep], backend="cuda", device=None, measured="", source="", margin=0.03)
    assert written["layers"][0]["blocks"] == [[4, 0]]


def test_the_lookup_takes_measured_counts_and_agreeing_neighbours_only(user_tables):
    user_tables(_table([_layer([[4, 8], [16, 8], [32, 16], [64, 32]])]))
    counts = (1, 3, 4, 5, 10, 16, 17, 31, 32, 40, 64, 65, 1000)
    got = {m: block_tables.measured_block_size("cuda", H200, num_tokens=m, **MIXTRAL) for m in counts}
    # Between 4 and 16 both say 8; between 16 and 32, 32 and 64 they differ: the rule's (None). Past 64 the
    # user's table says nothing and the shipped one has no 1000 either.
    assert got == {1: None, 3: None, 4: 8, 5: 8, 10: 8, 16: 8, 17: None, 31: None, 32: 16, 40: None, 64: 32,
                   65: None, 1000: None}
    # Another backend, device, dtype, shape or quantization: not this entry.
    for change in ({"dtype": "float32"}, {"top_k": 1}, {"bits": 8}, {"group_size": 32}):
        assert block_tables.measured_block_size("cuda", H200, num_tokens=32, **{**MIXTRAL, **change}) is None
    # bfloat16 runs float16's tiles: it takes the float16 entry until it has one of its own, which goes first.
    bf16 = {**MIXTRAL, "dtype": "bfloat16"}
    assert block_tables.measured_block_size("cuda", H200, num_tokens=32, **bf16) == 16
    user_tables(_table([_layer([[4, 8], [16, 8], [32, 16], [64, 32]]), _layer([[32, 64]], dtype="bfloat16")]))
    assert block_tables.measured_block_size("cuda", H200, num_tokens=32, **bf16) == 64
    assert block_tables.measured_block_size("cuda", H200, num_tokens=32, **MIXTRAL) == 16
    assert block_tables.measured_block_size("cpu", H200, num_tokens=32, **MIXTRAL) is None
    assert block_tables.measured_block_size("cuda", "CUDA sm_90, NVIDIA H100, 132 SMs", num_tokens=32,
                                            **MIXTRAL) is None
    # The device is a whole field of the description, not any substring of it.
    # (48: between the shipped H200 table's 32 and 64, which differ, so it has no block there.)
    user_tables(_table([_layer([[48, 32]])], device="NVIDIA H20"))
    assert block_tables.measured_block_size("cuda", "CUDA sm_90, NVIDIA H20, 78 SMs", num_tokens=48,
                                            **MIXTRAL) == 32
    assert block_tables.measured_block_size("cuda", H200, num_tokens=48, **MIXTRAL) is None


def test_the_users_tables_go_first_to_last_and_empty_entries_are_skipped(user_tables, tmp_path, monkeypatch):
    first, second = user_tables(_table([_layer([[32, 16]])]), _table([_layer([[32, 32], [64, 32]])]))
    monkeypatch.setenv(block_tables.ENV, os.pathsep.join(["", first, "", second, ""]))
    assert block_tables.measured_block_size("cuda", H200, num_tokens=32, **MIXTRAL) == 16
    assert block_tables.measured_block_size("cuda", H200, num_tokens=64, **MIXTRAL) is None  # first entry: 32 only


def test_a_users_table_comes_before_the_shipped_one(user_tables):
    shipped = json.loads(H200_TABLE.read_text())
    mixtral, = [layer for layer in shipped["layers"] if layer["model"] == "mixtral"]
    m, block = mixtral["blocks"][0]
    user_tables()  # none: the shipped table answers
    assert block_tables.measured_block_size("cuda", H200, num_tokens=m, **MIXTRAL) == block
    other = 16 if block != 16 else 32
    user_tables(_table([_layer([[m, other]])]))
    assert block_tables.measured_block_size("cuda", H200, num_tokens=m, **MIXTRAL) == other


BAD_TABLES = [  # (the table, or how to spoil a good one; words the error must hold)
    ("{not json", "not JSON"),
    (b"\xff\xfe{}", "not JSON text"),
    ([1, 2], "a JSON object"),
    ({**_table([]), "schema": 2}, "schema 2"),
    ({**_table([]), "schema": "1"}, "'schema' must be an integer"),
    ({k: v for k, v in _table([]).items() if k != "layers"}, "missing field 'layers'"),
    ({**_table([]), "device": 7}, "'device' must be a str"),
    ({k: v for k, v in _table([]).items() if k != "backend"}, "missing field 'backend'"),
    (_table([], device=""), "must not be empty"),
    ({**_table([]), "layers": {}}, "'layers' must be a list"),
    (_table(["x"]), "layers[0] must be an object"),
    (_table([_layer([[4, 8]], experts=0)]), "'experts' must be at least 1"),
    (_table([_layer([[4, 8]], hidden="4096")]), "'hidden' must be an integer"),
    (_table([_layer([[4, 8]], top_k=True)]), "'top_k' must be an integer"),
    (_table([_layer([[4, 8]], dtype="int8")]), "'dtype' must be one of"),
    (_table([_layer([])]), "'blocks' is empty"),
    (_table([{**_layer([]), "blocks": {"4": 8}}]), "'blocks' must be a list"),
    (_table([_layer([[4, 8]], bits=3)]), "'bits' must be 4 or 8"),
    (_table([_layer([[4, 8]], group_size=0)]), "'group_size' must be positive or -1"),
    (_table([_layer([[4]])]), "blocks[0] must be [token count, block size]"),
    (_table([_layer([[4, 8.0]])]), "blocks[0] must be [token count, block size]"),
    (_table([_layer([[4, -1]])]), "block size must be in [0, 65536] (0: pair routing); got -1"),
    (_table([_layer([[4, 1 << 20]])]), "block size must be in [0, 65536]"),
    (_table([_layer([[0, 8]])]), "positive and increasing"),
    (_table([_layer([[8, 8], [8, 16]])]), "positive and increasing"),
    (_table([_layer([[4, 8]]), _layer([[8, 16]])]), "a second entry"),
]


@pytest.mark.parametrize("table, words", BAD_TABLES)
def test_a_malformed_table_is_refused_by_file_and_field(user_tables, table, words):
    path, = user_tables(table)
    with pytest.raises(ValueError) as error:
        block_tables.measured_block_size("cuda", H200, num_tokens=8, **MIXTRAL)
    assert path in str(error.value) and words in str(error.value)


@pytest.mark.parametrize("where", ["nowhere.json", "."])  # a missing file, a folder
def test_an_unreadable_table_is_named(tmp_path, monkeypatch, where):
    path = tmp_path / where
    monkeypatch.setenv(block_tables.ENV, str(path))
    with pytest.raises(ValueError, match=re.escape(f"block table {path}: cannot be read")):
        block_tables.measured_block_size("cuda", H200, num_tokens=8, **MIXTRAL)


def test_a_layer_call_names_a_bad_table(rng, user_tables):
    path, = user_tables("{not json")
    e, hidden, inter = 4, 64, 32
    w13 = fm.ExpertStack.from_gptq([random_weight(rng, hidden, 2 * inter, group_size=32, dtype="float32")
                                    for _ in range(e)], dtype="float32")
    w2 = fm.ExpertStack.from_gptq([random_weight(rng, inter, hidden, group_size=32, dtype="float32")
                                   for _ in range(e)], dtype="float32")
    x = random_activations(rng, (3, hidden), "float32")
    ids = np.array([[0, 1], [2, 3], [1, 2]], np.int32)
    tw = rng.random((3, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=re.escape(f"block table {path}: not JSON")):
        fm.fused_moe(x, w13, w2, tw, ids)
    fm.fused_moe(x, w13, w2, tw, ids, block_size=16)  # a named block asks no table


@pytest.mark.parametrize("m", [5, 20, 130])
def test_the_layer_runs_the_tables_block_and_stays_exact(rng, target, user_tables, used_blocks, m):
    dtype = target.dtypes[-1]
    e, top_k, hidden, inter = 8, 2, 128, 96
    info, = [b for b in fm.backends() if b.name == target.backend]
    # The rule's blocks here: 8 (m = 5, 20: up to 6 pairs per expert), 32 (m = 130); the table's differ.
    table_blocks = [[5, 16], [20, 32], [130, 8]]
    assert [default_block_size(m_ * top_k, e) for m_, _ in table_blocks] == [8, 8, 32]
    user_tables(_table([_layer(table_blocks, experts=e, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype,
                               group_size=32)], backend=target.backend, device=info.description))
    w13, w2, s13, s2, x, ids, tw = _small_layer(rng, target, dtype, m, e, top_k, hidden, inter)
    out = target.put(poisoned((m, hidden), dtype))
    fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), out=out)
    assert used_blocks == [dict(table_blocks)[m]]
    assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]
    # A block the caller names wins over the table.
    used_blocks.clear()
    fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), out=out, block_size=64)
    assert used_blocks == [64]


def test_a_tables_pair_routing_skips_align_and_a_layer_still_sizes_its_routing(rng, target, user_tables,
                                                                               monkeypatch):
    """A table's block 0 at a count: the layer runs pair routing there (no
    align). A layer whose largest count routes pairs still grows its routing
    buffers then, so a smaller count that aligns allocates nothing (MoE's
    CUDA-graph promise)."""
    dtype = target.dtypes[-1]
    e, top_k, hidden, inter = 8, 2, 128, 96
    info, = [b for b in fm.backends() if b.name == target.backend]
    user_tables(_table([_layer([[3, 16], [6, 0]], experts=e, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype,
                               group_size=32)], backend=target.backend, device=info.description))
    blocks = []
    real_layer = moe_module._core.moe_layer
    monkeypatch.setattr(moe_module._core, "moe_layer", lambda *a: blocks.append(a[8]) or real_layer(*a))
    w13, w2, s13, s2, x, ids, tw = _small_layer(rng, target, dtype, 6, e, top_k, hidden, inter)
    layer = fm.MoE(s13, s2, top_k=top_k)
    out = target.put(poisoned((6, hidden), dtype))
    layer(target.put(x), target.put(tw), target.put(ids), out=out)
    assert blocks == [0]
    assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]
    ws = layer._workspace(0)
    kept = dict(ws._buffers)
    assert {"sorted_token_ids", "expert_ids", "post"} <= kept.keys()
    out3 = target.put(poisoned((3, hidden), dtype))
    layer(target.put(x[:3]), target.put(tw[:3]), target.put(ids[:3]), out=out3)
    assert blocks == [0, 16]
    assert all(ws._buffers[name] is buf for name, buf in kept.items()), "the aligned call allocated"
    assert rel_error(target.get(out3), reference_moe(x[:3], w13, w2, tw[:3], ids[:3])) < REL_TOL[dtype]


def test_a_layer_keeps_the_block_it_chose_for_a_token_count(rng, target, user_tables, used_blocks):
    """fm.MoE asks the tables at a token count's first call and keeps the answer
    (a decode step would otherwise pay the lookup every call); a new layer reads
    the tables as they are then."""
    dtype = target.dtypes[-1]
    e, top_k, hidden, inter, m = 8, 2, 128, 96, 5
    info, = [b for b in fm.backends() if b.name == target.backend]

    def table(block):
        return _table([_layer([[m, block]], experts=e, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype,
                              group_size=32)], backend=target.backend, device=info.description)

    w13, w2, s13, s2, x, ids, tw = _small_layer(rng, target, dtype, m, e, top_k, hidden, inter)
    user_tables(table(16))
    layer = fm.MoE(s13, s2, top_k=top_k)
    for block in (16, 32):  # the second table reaches only the new layer
        user_tables(table(block))
        for _ in range(2):
            out = target.put(poisoned((m, hidden), dtype))
            layer(target.put(x), target.put(tw), target.put(ids), out=out)
            assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]
    fm.MoE(s13, s2, top_k=top_k)(target.put(x), target.put(tw), target.put(ids))
    assert used_blocks == [16, 16, 16, 16, 32]


# ---- tuning on this machine (fm.tune_block_sizes, ferrum-moe tune) ----------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory of this test's own."""
    monkeypatch.setenv(block_tables.CACHE_ENV, str(tmp_path / "cache"))
    block_tables.reread()
    yield tmp_path / "cache" / "block_tables"
    block_tables.reread()


DEVICES = list({(t.backend, t.device): t for t in TARGETS}.values())  # one target per backend and device


def _stacks(rng, target, e=8, hidden=64, inter=32, dtype="float16"):
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=32, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=32, dtype=dtype) for _ in range(e)]
    return w13, w2, target.stack(w13, dtype), target.stack(w2, dtype)


def test_best_block_keeps_the_rule_within_the_margin():
    assert block_tables.best_block({8: 1.00, 16: 1.01, 32: 0.99}, 16, 0.03) == 16
    assert block_tables.best_block({8: 1.00, 16: 1.05, 32: 0.99}, 16, 0.03) == 32
    assert block_tables.best_block({8: 1.00, 32: 0.99}, 16, 0.03) == 32, "a rule not swept cannot be kept"


@pytest.mark.parametrize("target", DEVICES, ids=repr)
def test_tuning_times_every_block_and_keeps_the_fastest_or_the_rule(rng, target, cache):
    _, _, s13, s2 = _stacks(rng, target)
    seen = []
    result = fm.tune_block_sizes(s13, s2, top_k=2, token_counts=[16, 1], blocks=[16, 8, 0], seconds=0.002, rounds=2,
                                 progress=seen.append)
    assert [c.tokens for c in result.counts] == [1, 16] and seen == result.counts
    for c in result.counts:  # 0: pair routing
        assert sorted(c.times_us) == [0, 8, 16] and all(0 < t < 1e6 for t in c.times_us.values())
        assert c.rule == default_block_size(c.tokens * 2, 8)
        assert c.block == block_tables.best_block(c.times_us, c.rule, 0.03)
    assert result.path.parent == cache and result.device == s13._backend_description
    assert block_tables.read_table(result.path)


@pytest.mark.parametrize("target", DEVICES, ids=repr)
def test_a_tuned_block_is_what_later_calls_take(rng, target, cache, used_blocks, monkeypatch):
    """Block 16 made to win at 8 tokens (the rule says 8): the table written
    says so, the lookup answers it, and a new layer runs it and stays exact."""
    from ferrum_moe import tuning

    w13, w2, s13, s2 = _stacks(rng, target)
    lookup = (target.backend, s13._backend_description, 8, 2, 64, 32, "float16", 4, 32, 8)
    assert block_tables.measured_block_size(*lookup) is None, "read before tuning: the process must read again"
    fake = iter([5.0, 1.0, 5.0, 5.0] * 4)  # per count, block 8 then 16: 16 wins at the first count only
    timer = tuning._timer(s13, 0.001)
    monkeypatch.setattr(tuning, "_timer", lambda stack, seconds: timer)
    monkeypatch.setattr(timer, "time", lambda call: next(fake) * 1e-3)
    result = fm.tune_block_sizes(s13, s2, top_k=2, token_counts=[8, 64], blocks=[8, 16], rounds=1)
    assert [(c.tokens, c.block) for c in result.counts] == [(8, 16), (64, 8)]
    assert block_tables.measured_block_size(*lookup) == 16
    x = random_activations(rng, (8, 64), "float16")
    ids = np.argsort(-rng.standard_normal((8, 8)), axis=1)[:, :2].astype(np.int32)
    tw = rng.random((8, 2)).astype(np.float32)
    out = target.put(poisoned((8, 64), "float16"))
    used_blocks.clear()
    fm.MoE(s13, s2, top_k=2)(target.put(x), target.put(tw), target.put(ids), out=out)
    assert used_blocks == [16]
    assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL["float16"]


@pytest.mark.parametrize("target", DEVICES, ids=repr)
def test_the_timer_runs_the_layer_it_times(rng, target, cache):
    """What a sweep times is the layer's call: one replay (a graph on CUDA)
    writes the layer's output."""
    from ferrum_moe import tuning

    w13, w2, s13, s2 = _stacks(rng, target)
    timer = tuning._timer(s13, 0.001)
    x, tw, ids = tuning._inputs(rng, 5, 64, 8, 2, "float16")
    xs, tws, idss = (timer.put(a) for a in (x, tw, ids))
    out = timer.put(poisoned((5, 64), "float16"))  # numpy on a host backend, torch on CUDA
    layer = fm.MoE(s13, s2, top_k=2, block_size=16)
    replay = timer.prepare(lambda: layer(xs, tws, idss, out=out, stream=timer.stream))
    out[...] = timer.put(poisoned((5, 64), "float16"))  # poisoned again after the warm-up and capture
    replay()
    assert timer.time(replay) > 0
    got = out if isinstance(out, np.ndarray) else out.cpu().numpy()
    assert rel_error(got, reference_moe(x, w13, w2, tw, ids)) < REL_TOL["float16"]


def test_tuning_merges_with_the_table_it_finds(rng, cache, monkeypatch):
    from ferrum_moe import tuning

    target = TARGETS[0]
    _, _, a13, a2 = _stacks(rng, target)
    _, _, b13, b2 = _stacks(rng, target, e=4, inter=16)
    first = fm.tune_block_sizes(a13, a2, top_k=2, token_counts=[1, 4], blocks=[8], seconds=0.001, rounds=1)
    fm.tune_block_sizes(b13, b2, top_k=1, token_counts=[2], blocks=[8], seconds=0.001, rounds=1)
    again = fm.tune_block_sizes(a13, a2, top_k=2, token_counts=[4, 32], blocks=[16], seconds=0.001, rounds=1)
    assert again.path == first.path and sorted(cache.iterdir()) == [first.path]
    layers = {(layer["experts"], layer["top_k"]): layer["blocks"] for layer in json.loads(first.path.read_text())["layers"]}
    assert layers == {(8, 2): [[1, 8], [4, 16], [32, 16]], (4, 1): [[2, 8]]}, "kept, replaced, added"
    assert tuning.table_file(target.backend, a13._backend_description) == first.path


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(token_counts=[]), ValueError, "token_counts must not be empty"),
    (dict(token_counts=[4, 0]), ValueError, r"token_counts\[1\] must be in \[1, 1048576\]; got 0"),
    (dict(token_counts="16"), TypeError, "token_counts must be a sequence of ints; got str"),
    (dict(blocks=[8, 2**17]), ValueError, r"blocks\[1\] must be in \[0, 65536\]; got 131072"),
    (dict(margin=1.5), ValueError, r"margin must be in \[0, 1\); got 1.5"),
    (dict(margin="0.1"), TypeError, r"margin must be a number; got str"),
    (dict(seconds=0), ValueError, r"seconds must be in \(0, 60\]; got 0"),
    (dict(seed=-1), ValueError, r"seed must be in >= 0; got -1"),
    (dict(rounds=0), ValueError, "rounds must be"),
    (dict(top_k=9), ValueError, r"top_k must be in \[1, 8\] \(the stacks' experts\); got 9"),
])
def test_tuning_refuses_bad_arguments_by_name(rng, cache, kwargs, error, message):
    _, _, s13, s2 = _stacks(rng, TARGETS[0])
    args = dict(top_k=2, token_counts=[1], blocks=[8], seconds=0.001)
    args.update(kwargs)
    with pytest.raises(error, match="tune_block_sizes: " + message):
        fm.tune_block_sizes(s13, s2, **args)
    assert not cache.exists(), "nothing is written for a refused sweep"


def test_a_damaged_cache_table_is_named_not_replaced(rng, cache):
    _, _, s13, s2 = _stacks(rng, TARGETS[0])
    from ferrum_moe import tuning

    path = tuning.table_file("cpu", s13._backend_description)
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": 1, "backend": "cpu"')
    with pytest.raises(ValueError, match=f"tune_block_sizes: block table {re.escape(str(path))}: not JSON text .*; "
                                         "delete it to start a new one"):
        fm.tune_block_sizes(s13, s2, top_k=2, token_counts=[1], blocks=[8], seconds=0.001)
    assert path.read_text() == '{"schema": 1, "backend": "cpu"'
    # A layer call does not fail on it: the table is skipped, with a warning naming it.
    with pytest.warns(UserWarning, match=f"block table {re.escape(str(path))}: not JSON text .*; skipped"):
        y = fm.MoE(s13, s2, top_k=2)(*_one_call(rng))
    assert y.shape == (3, 64)


def _one_call(rng):
    x = random_activations(rng, (3, 64), "float16")
    return x, rng.random((3, 2)).astype(np.float32), np.argsort(-rng.standard_normal((3, 8)), axis=1)[:, :2] \
        .astype(np.int32)


def test_an_unwritable_cache_is_named_with_the_way_out(rng, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(block_tables.CACHE_ENV, str(blocker))
    _, _, s13, s2 = _stacks(rng, TARGETS[0])
    with pytest.raises(OSError, match=r"cannot write the block table .*file/block_tables/cpu-.*\.json .*set "
                                      r"FERRUM_MOE_CACHE_DIR to a writable directory, or pass save=False"):
        fm.tune_block_sizes(s13, s2, top_k=2, token_counts=[1], blocks=[8], seconds=0.001)
    assert fm.tune_block_sizes(s13, s2, top_k=2, token_counts=[1], blocks=[8], seconds=0.001, save=False).path is None


def test_the_cli_tunes_a_checkpoints_layer_shape(tmp_path, rng, cache, capsys):
    from ferrum_moe import cli
    from model_dirs import Quant, base_config, write_model

    write_model(tmp_path / "model", base_config("qwen3_moe", experts=8, top_k=2),
                Quant(bits=8, group_size=32, sym=False, act_order=True), rng)
    assert cli.main(["tune", str(tmp_path / "model"), "--tokens", "1", "4", "--blocks", "8", "16",
                     "--seconds", "0.001"]) == 0
    printed = capsys.readouterr().out
    assert "Qwen3-MoE" in printed and \
        "8 experts, top-2, hidden 64, intermediate 48; float16, INT8 group 32, zero points, act-order" in printed
    assert re.search(r"^\s+1\s+[\d.]+\*?\s+[\d.]+\*?\s+8\s+(8|16)$", printed, re.M), printed
    path, = cache.iterdir()
    layer, = json.loads(path.read_text())["layers"]
    assert (layer["experts"], layer["top_k"], layer["hidden"], layer["inter"], layer["bits"], layer["group_size"]) == \
        (8, 2, 64, 48, 8, 32)
    assert [m for m, _ in layer["blocks"]] == [1, 4]
