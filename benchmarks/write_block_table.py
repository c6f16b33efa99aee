"""Writes a block table (src/ferrum_moe/block_tables.py) from bench_moe.py results.

    python benchmarks/write_block_table.py results.json [more.json ...] \
        --measured 2026-12-04 [--device "NVIDIA H200"] [--backend cuda] [--margin 0.03] -o table.json

Every row of the results that timed several routing block sizes
(`bench_moe.py --block-sizes ...`) gives one [token count, block] pair: the
block with the least time, unless routing.default_block_size's block is within
--margin of it (a sweep's repeats differ by a few percent: a table departs from
the rule only where a block wins by more). A row that did not time the rule's
block gives nothing (the table could only depart from the rule blindly). Rows of
one layer shape, dtype, bits and group size form one entry; a later file's row
replaces an earlier one's at the same token count, whatever blocks either timed
(pass a narrower sweep after a wider one only where its answer should stand). Rows name their layer's shape and quantization
(bench_moe.py writes them; older results without them take gpu_bench.MODELS'
shape and GPTQ INT4 group 128). The device is the rows' (all must agree). Rows of
act-order stacks (`bench_moe.py --act-order`) are left out: the table's entries
name no act-order, and such stacks take the plain stacks' blocks.
Needs no GPU.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from ferrum_moe.block_tables import SCHEMA, best_block, format_table, parse_table
from ferrum_moe.routing import default_block_size

SHAPE = ("experts", "top_k", "hidden", "inter")
QUANT = ("bits", "group_size")


def _shape(row: dict) -> tuple[int, ...]:
    if all(key in row for key in SHAPE):
        return tuple(row[key] for key in SHAPE)
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from gpu_bench import MODELS  # imports torch: only for results older than the shape in each row
    return MODELS[row["model"]]


def table_from_results(results: list[dict], *, backend: str, device: str | None, measured: str, source: str,
                       margin: float) -> dict:
    """The block table (a JSON-ready dict) of bench_moe result documents."""
    best: dict[tuple, dict[int, int]] = {}
    names: dict[tuple, str] = {}
    devices = set()
    for doc in results:
        for row in doc["rows"]:
            times = row.get("ferrum_us_by_block_size")
            if not times or row.get("act_order"):
                continue  # act-order stacks run the plain stacks' blocks: their sweeps do not write the table
            devices.add(row.get("device", doc.get("device")))
            shape = _shape(row)
            key = (*shape, row["dtype"], row.get("bits", 4), row.get("group_size", 128))
            names.setdefault(key, row["model"])
            m = int(row["m"])
            times = {int(block): t for block, t in times.items()}
            rule = default_block_size(m * shape[1], shape[0])
            if rule not in times:
                continue  # what the layer runs without a table was not timed: nothing to depart from
            best.setdefault(key, {})[m] = best_block(times, rule, margin)
    if device is None:
        if len(devices) != 1 or None in devices:
            raise SystemExit(f"the rows name devices {sorted(map(str, devices))}: pass --device, or one device's rows")
        device = devices.pop()
    elif devices - {device}:
        raise SystemExit(f"--device {device!r}, but the rows were measured on {sorted(map(str, devices))}")
    layers = []
    for key, blocks in sorted(best.items()):
        layers.append(dict(model=names[key], **dict(zip(SHAPE + ("dtype",) + QUANT, key)),
                           blocks=[[m, blocks[m]] for m in sorted(blocks)]))
    table = dict(schema=SCHEMA, backend=backend, device=device, measured=measured, source=source, layers=layers)
    parse_table(table, "the written table")  # what the library will accept
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="bench_moe.py --json outputs with ferrum_us_by_block_size")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--device", help="matched against the backend's description (default: the rows' device)")
    parser.add_argument("--margin", type=float, default=0.03,
                        help="keep the rule's block within this fraction of the fastest (default 0.03)")
    parser.add_argument("--measured", required=True, help="the date of the measurement")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    docs = [json.loads(pathlib.Path(p).read_text()) for p in args.results]
    source = ", ".join(pathlib.Path(p).name for p in args.results)
    table = table_from_results(docs, backend=args.backend, device=args.device, measured=args.measured,
                               source=f"benchmarks/write_block_table.py from {source}", margin=args.margin)
    if not table["layers"]:
        print("no row timed several block sizes including the rule's (run bench_moe.py with --block-sizes)",
              file=sys.stderr)
        return 1
    pathlib.Path(args.out).write_text(format_table(table))
    for layer in table["layers"]:
        print(f"{layer['model']} {layer['dtype']}: " + ", ".join(f"M={m}: {b}" for m, b in layer["blocks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
