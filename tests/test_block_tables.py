"""Measured block tables (ferrum_moe/block_tables.py): the shipped ones agree
with the sweep they were written from, the lookup takes the right entry and
token count, a malformed table is refused by name, and a layer call takes the
table's block and stays exact."""

import json
import os
import pathlib

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe import block_tables
from ferrum_moe import moe as moe_module
from ferrum_moe.routing import default_block_size
from ferrum_moe.testing import REL_TOL, poisoned, random_activations, random_weight, reference_moe, rel_error

REPO = pathlib.Path(__file__).resolve().parents[1]
H200_TABLE = block_tables.SHIPPED / "cuda-h200.json"
H200_SWEEP = REPO / "benchmarks" / "results-h200-2026-12-04-blocks-v34.json"


def _table(layers, backend="cuda", device="NVIDIA H200"):
    return {"schema": 1, "backend": backend, "device": device, "measured": "2026-12-04", "layers": layers}


def _layer(blocks, experts=8, top_k=2, hidden=4096, inter=14336, dtype="float16"):
    return {"experts": experts, "top_k": top_k, "hidden": hidden, "inter": inter, "dtype": dtype, "blocks": blocks}


@pytest.fixture
def user_tables(tmp_path, monkeypatch):
    """Writes tables to files named by FERRUM_MOE_BLOCK_TABLES (first first)."""
    def write(*tables):
        paths = []
        for i, table in enumerate(tables):
            path = tmp_path / f"table{i}.json"
            path.write_text(table if isinstance(table, str) else json.dumps(table))
            paths.append(str(path))
        monkeypatch.setenv(block_tables.ENV, os.pathsep.join(paths))
        return paths
    return write


def test_the_shipped_tables_parse():
    tables = sorted(block_tables.SHIPPED.glob("*.json"))
    assert H200_TABLE in tables
    for path in tables:
        assert block_tables.read_table(path), f"{path} has no layer"


def test_the_h200_table_is_its_sweeps_fastest_block_per_row():
    pytest.importorskip("torch")  # write_block_table reads the shapes from gpu_bench, which imports torch
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from write_block_table import table_from_results
    sweep = json.loads(H200_SWEEP.read_text())
    written = table_from_results([sweep], backend="cuda", device="NVIDIA H200", measured="2026-12-04", source="")
    shipped = json.loads(H200_TABLE.read_text())
    assert written["layers"] == shipped["layers"]
    # And independently of the writer: every entry's block is the row's fastest.
    for layer in shipped["layers"]:
        for m, block in layer["blocks"]:
            row, = [r for r in sweep["rows"] if r["model"] == layer["model"] and r["dtype"] == layer["dtype"]
                    and r["m"] == m]
            times = row["ferrum_us_by_block_size"]
            assert times[str(block)] == min(times.values())


def test_the_lookup_takes_measured_counts_and_agreeing_neighbours_only(user_tables):
    user_tables(_table([_layer([[4, 8], [16, 8], [32, 16], [64, 32]])]))
    shape = dict(experts=8, top_k=2, hidden=4096, inter=14336, dtype="float16")
    desc = "CUDA sm_90, NVIDIA H200, 132 SMs"
    counts = (1, 3, 4, 5, 10, 16, 17, 31, 32, 40, 64, 65, 1000)
    got = {m: block_tables.tuned_block_size("cuda", desc, num_tokens=m, **shape) for m in counts}
    # Between 4 and 16 both say 8; between 16 and 32, 32 and 64 they differ: the rule's (None).
    assert got == {1: None, 3: None, 4: 8, 5: 8, 10: 8, 16: 8, 17: None, 31: None, 32: 16, 40: None, 64: 32,
                   65: None, 1000: None}
    # Another backend, device, dtype or shape: not this entry (the shipped H200 table has no such layer either).
    assert block_tables.tuned_block_size("cpu", desc, num_tokens=32, **shape) is None
    assert block_tables.tuned_block_size("cuda", "CUDA sm_90, NVIDIA H100", num_tokens=32, **shape) is None
    assert block_tables.tuned_block_size("cuda", desc, num_tokens=32, **{**shape, "dtype": "bfloat16"}) is None
    assert block_tables.tuned_block_size("cuda", desc, num_tokens=32, **{**shape, "top_k": 1}) is None


def test_a_users_table_comes_before_the_shipped_one(user_tables):
    shipped = json.loads(H200_TABLE.read_text())
    mixtral, = [layer for layer in shipped["layers"] if layer["model"] == "mixtral"]
    m, block = mixtral["blocks"][0]
    shape = dict(experts=8, top_k=2, hidden=4096, inter=14336, dtype="float16")
    desc = "CUDA sm_90, NVIDIA H200, 132 SMs"
    user_tables()  # none: the shipped table answers
    assert block_tables.tuned_block_size("cuda", desc, num_tokens=m, **shape) == block
    other = 16 if block != 16 else 32
    user_tables(_table([_layer([[m, other]])]))
    assert block_tables.tuned_block_size("cuda", desc, num_tokens=m, **shape) == other


BAD_TABLES = [  # (the table, or how to spoil a good one; words the error must hold)
    ("{not json", "not JSON"),
    ([1, 2], "a JSON object"),
    ({**_table([]), "schema": 2}, "schema 2"),
    ({k: v for k, v in _table([]).items() if k != "backend"}, "missing field 'backend'"),
    (_table([], device=""), "must not be empty"),
    ({**_table([]), "layers": {}}, "'layers' must be a list"),
    (_table(["x"]), "layers[0] must be an object"),
    (_table([_layer([[4, 8]], experts=0)]), "'experts' must be at least 1"),
    (_table([_layer([[4, 8]], hidden="4096")]), "'hidden' must be an integer"),
    (_table([_layer([[4, 8]], top_k=True)]), "'top_k' must be an integer"),
    (_table([_layer([[4, 8]], dtype="int8")]), "'dtype' must be one of"),
    (_table([_layer([])]), "'blocks' is empty"),
    (_table([_layer([[4]])]), "blocks[0] must be [token count, block size]"),
    (_table([_layer([[4, 8.0]])]), "blocks[0] must be [token count, block size]"),
    (_table([_layer([[4, 0]])]), "block size must be in [1, 65536]"),
    (_table([_layer([[4, 1 << 20]])]), "block size must be in [1, 65536]"),
    (_table([_layer([[0, 8]])]), "positive and increasing"),
    (_table([_layer([[8, 8], [8, 16]])]), "positive and increasing"),
    (_table([_layer([[4, 8]]), _layer([[8, 16]])]), "a second entry"),
]


@pytest.mark.parametrize("table, words", BAD_TABLES)
def test_a_malformed_table_is_refused_by_file_and_field(user_tables, table, words):
    path, = user_tables(table)
    with pytest.raises(ValueError) as error:
        block_tables.tuned_block_size("cuda", "NVIDIA H200", 8, 2, 4096, 14336, "float16", 8)
    assert path in str(error.value) and words in str(error.value)


def test_a_missing_table_file_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.json"
    monkeypatch.setenv(block_tables.ENV, str(missing))
    with pytest.raises(ValueError, match=f"block table {missing}: cannot be read"):
        block_tables.tuned_block_size("cuda", "NVIDIA H200", 8, 2, 4096, 14336, "float16", 8)


@pytest.mark.parametrize("m", [5, 20, 130])
def test_the_layer_runs_the_tables_block_and_stays_exact(rng, target, user_tables, monkeypatch, m):
    dtype = target.dtypes[-1]
    e, top_k, hidden, inter = 8, 2, 128, 96
    info, = [b for b in fm.backends() if b.name == target.backend]
    # The rule's blocks here: 8 (m = 5, 20: up to 6 pairs per expert), 32 (m = 130); the table's differ.
    table_blocks = [[5, 16], [20, 32], [130, 8]]
    assert [default_block_size(m_ * top_k, e) for m_, _ in table_blocks] == [8, 8, 32]
    user_tables(_table([_layer(table_blocks, experts=e, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype)],
                       backend=target.backend, device=info.description))
    used = []
    real_align = moe_module._align

    def recording_align(core, ids, block_size, *args, **kwargs):
        used.append(block_size)
        return real_align(core, ids, block_size, *args, **kwargs)

    monkeypatch.setattr(moe_module, "_align", recording_align)
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=32, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=32, dtype=dtype) for _ in range(e)]
    s13, s2 = target.stack(w13, dtype), target.stack(w2, dtype)
    x = random_activations(rng, (m, hidden), dtype)
    ids = np.argsort(-rng.standard_normal((m, e)), axis=1)[:, :top_k].astype(np.int32)
    tw = rng.random((m, top_k)).astype(np.float32)
    out = target.put(poisoned((m, hidden), dtype))
    fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), out=out)
    assert used == [dict(table_blocks)[m]]
    assert rel_error(target.get(out), reference_moe(x, w13, w2, tw, ids)) < REL_TOL[dtype]
    # A block the caller names wins over the table.
    used.clear()
    fm.fused_moe(target.put(x), s13, s2, target.put(tw), target.put(ids), out=out, block_size=64)
    assert used == [64]
