"""Writes a block table (src/ferrum_moe/block_tables.py) from bench_moe.py results.

    python benchmarks/write_block_table.py results.json [more.json ...] \
        --device "NVIDIA H200" [--backend cuda] [--measured 2026-12-04] -o table.json

Every row of the results that timed several routing block sizes
(`bench_moe.py --block-sizes ...`) gives one [token count, block] pair: the
block with the least time. Rows of one layer and dtype form one entry; a later
file's row replaces an earlier one's at the same token count. Rows name their
layer's shape (bench_moe.py writes it; rows of older results without it take
gpu_bench.MODELS' shape for their model). Needs no GPU.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from ferrum_moe.block_tables import SCHEMA, parse_table

SHAPE = ("experts", "top_k", "hidden", "inter")


def _shape(row: dict) -> tuple[int, ...]:
    if all(key in row for key in SHAPE):
        return tuple(row[key] for key in SHAPE)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from gpu_bench import MODELS  # imports torch: only for results older than the shape in each row
    return MODELS[row["model"]]


def table_from_results(results: list[dict], *, backend: str, device: str, measured: str, source: str) -> dict:
    """The block table (a JSON-ready dict) of bench_moe result documents."""
    best: dict[tuple, dict[int, int]] = {}
    for doc in results:
        for row in doc["rows"]:
            times = row.get("ferrum_us_by_block_size")
            if not times:
                continue
            block = min(times, key=lambda b: times[b])
            best.setdefault((row["model"], *_shape(row), row["dtype"]), {})[int(row["m"])] = int(block)
    layers = []
    for (model, *shape, dtype), blocks in sorted(best.items()):
        layers.append(dict(model=model, **dict(zip(SHAPE, shape)), dtype=dtype,
                           blocks=[[m, blocks[m]] for m in sorted(blocks)]))
    table = dict(schema=SCHEMA, backend=backend, device=device, measured=measured, source=source, layers=layers)
    parse_table(table, "the written table")  # what the library will accept
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="bench_moe.py --json outputs with ferrum_us_by_block_size")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--device", required=True, help="matched against the backend's description")
    parser.add_argument("--measured", required=True, help="the date of the measurement")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args()
    docs = [json.loads(pathlib.Path(p).read_text()) for p in args.results]
    source = ", ".join(pathlib.Path(p).name for p in args.results)
    table = table_from_results(docs, backend=args.backend, device=args.device, measured=args.measured,
                               source=f"benchmarks/write_block_table.py from {source}")
    if not table["layers"]:
        print("no row timed several block sizes (run bench_moe.py with --block-sizes)", file=sys.stderr)
        return 1
    head = json.dumps({key: value for key, value in table.items() if key != "layers"}, indent=1)
    layers = ",\n".join("  " + json.dumps(layer) for layer in table["layers"])  # a layer a line
    pathlib.Path(args.out).write_text(f"{head[:-2]},\n \"layers\": [\n{layers}\n ]\n}}\n")
    for layer in table["layers"]:
        print(f"{layer['model']} {layer['dtype']}: " + ", ".join(f"M={m}: {b}" for m, b in layer["blocks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
