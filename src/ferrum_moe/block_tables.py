"""Measured routing block sizes: per backend, device, layer shape and token count.

The routing block size picks how many rows of an expert one tile of the routed
GEMMs takes (on CUDA, the tile height), and no one rule is best for every
layer: a block table records, for the layers it was measured on, the fastest
block at each token count a sweep timed. ``fused_moe`` and ``MoE`` ask the
tables before ``routing.default_block_size``'s rule, when the caller passes no
block size:

- the tables named by ``FERRUM_MOE_BLOCK_TABLES`` (paths, separated by
  ``os.pathsep``), first to last, then
- the tables ``fm.tune_block_sizes`` (``ferrum-moe tune``) measured on this
  machine, in ``cache_dir()``: ``$FERRUM_MOE_CACHE_DIR/block_tables``, else
  ``$XDG_CACHE_HOME/ferrum-moe/block_tables``, else
  ``~/.cache/ferrum-moe/block_tables``, then
- the tables shipped in ``ferrum_moe/block_tables_data/`` (written by
  ``benchmarks/write_block_table.py`` from ``bench_moe.py --block-sizes``).

The files are read once per process (per value of ``FERRUM_MOE_BLOCK_TABLES``;
the cache directory is found at the first lookup); a tuning run in the process
reads them again, and a layer keeps the block it chose for a token count. A
malformed table named by the variable or shipped is an error; one in the cache
is skipped with a warning (``ferrum-moe tune`` refuses to merge into it: delete
it to start again).

A table applies where its backend name equals the stack's backend's, its
device string equals the backend's description or one of its comma-separated
fields (``NVIDIA H200`` in ``CUDA sm_90, NVIDIA H200, 132 SMs``; the CUDA
backend's names its first device, so a machine of mixed GPUs matches by that
one), and a layer entry has the stacks' experts, top-k, hidden and
intermediate sizes, dtype, bits and group size (a float16 layer with no entry of its own takes a bfloat16
entry, and the other way round: the same tiles run both). Within an entry a measured token count takes its block, and a count
between two measured ones takes theirs where both have the same; between two
that differ (where the crossover lies was not measured), below the first and
past the last, the rule decides. The format (schema 1)::

    {"schema": 1, "backend": "cuda", "device": "NVIDIA H200",
     "measured": "2026-12-04", "source": "...",
     "layers": [{"experts": 8, "top_k": 2, "hidden": 4096, "inter": 14336,
                 "dtype": "float16", "bits": 4, "group_size": 128,
                 "blocks": [[4, 8], [32, 16], [64, 32]]}]}

``blocks`` holds [token count, block size] pairs in increasing token count; a
block size of 0 (``routing.PAIR_ROUTING``) says no align: each pair routes itself.
A malformed table is refused with an error naming its file and field.
"""
from __future__ import annotations

import bisect
import functools
import json
import os
import pathlib
import warnings

from ._checks import MAX_BLOCK_SIZE
from .routing import PAIR_ROUTING

SCHEMA = 1
ENV = "FERRUM_MOE_BLOCK_TABLES"
CACHE_ENV = "FERRUM_MOE_CACHE_DIR"
SHIPPED = pathlib.Path(__file__).parent / "block_tables_data"
_DTYPES = ("float16", "bfloat16", "float32")
# The 16-bit dtypes run the same tiles (the kernels differ in the conversions
# only), so a layer with no entry of its own dtype takes the other's.
_SAME_TILES = {"float16": ("bfloat16",), "bfloat16": ("float16",)}


def _field(doc: dict, key: str, kind, where: str):
    if key not in doc:
        raise ValueError(f"{where}: missing field {key!r}")
    value = doc[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: {key!r} must be an integer; got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise ValueError(f"{where}: {key!r} must be a {kind.__name__}; got {type(value).__name__}")
    return value


def parse_table(doc, where: str) -> dict:
    """Checks one table (a parsed JSON document) and answers {(backend, device,
    experts, top_k, hidden, inter, dtype, bits, group_size): (token counts,
    blocks)}; `where` names it in errors."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: a block table is a JSON object; got {type(doc).__name__}")
    if _field(doc, "schema", int, where) != SCHEMA:
        raise ValueError(f"{where}: schema {doc['schema']} is not supported (this ferrum-moe reads schema {SCHEMA})")
    backend = _field(doc, "backend", str, where)
    device = _field(doc, "device", str, where)
    if not backend or not device:
        raise ValueError(f"{where}: 'backend' and 'device' must not be empty")
    entries = {}
    for i, layer in enumerate(_field(doc, "layers", list, where)):
        at = f"{where}: layers[{i}]"
        if not isinstance(layer, dict):
            raise ValueError(f"{at} must be an object; got {type(layer).__name__}")
        shape = []
        for key in ("experts", "top_k", "hidden", "inter"):
            value = _field(layer, key, int, at)
            if value < 1:
                raise ValueError(f"{at}: {key!r} must be at least 1; got {value}")
            shape.append(value)
        dtype = _field(layer, "dtype", str, at)
        if dtype not in _DTYPES:
            raise ValueError(f"{at}: 'dtype' must be one of {_DTYPES}; got {dtype!r}")
        bits = _field(layer, "bits", int, at)
        if bits not in (4, 8):
            raise ValueError(f"{at}: 'bits' must be 4 or 8; got {bits}")
        group_size = _field(layer, "group_size", int, at)
        if group_size < 1 and group_size != -1:
            raise ValueError(f"{at}: 'group_size' must be positive or -1 (one group); got {group_size}")
        counts, blocks = [], []
        for j, pair in enumerate(_field(layer, "blocks", list, at)):
            if (not isinstance(pair, list) or len(pair) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in pair)):
                raise ValueError(f"{at}: blocks[{j}] must be [token count, block size] integers; got {pair!r}")
            m, block = pair
            if m < 1 or (counts and m <= counts[-1]):
                raise ValueError(f"{at}: blocks[{j}]: token counts must be positive and increasing; got {m} "
                                 f"after {counts[-1] if counts else 'nothing'}")
            if not PAIR_ROUTING <= block <= MAX_BLOCK_SIZE:
                raise ValueError(f"{at}: blocks[{j}]: block size must be in [{PAIR_ROUTING}, {MAX_BLOCK_SIZE}] "
                                 f"({PAIR_ROUTING}: pair routing); got {block}")
            counts.append(m)
            blocks.append(block)
        if not counts:
            raise ValueError(f"{at}: 'blocks' is empty")
        key = (backend, device, *shape, dtype, bits, group_size)
        if key in entries:
            raise ValueError(f"{at}: a second entry for experts {shape[0]}, top_k {shape[1]}, hidden {shape[2]}, "
                             f"inter {shape[3]}, {dtype}, {bits} bits, group size {group_size}")
        entries[key] = (tuple(counts), tuple(blocks))
    return entries


def format_table(table: dict) -> str:
    """A table as JSON text, one layer entry a line."""
    head = json.dumps({key: value for key, value in table.items() if key != "layers"}, indent=1)
    layers = ",\n".join("  " + json.dumps(layer) for layer in table["layers"])
    return f"{head[:-2]},\n \"layers\": [\n{layers}\n ]\n}}\n"


def read_table(path) -> dict:
    """parse_table of the JSON file at `path`."""
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"block table {path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"block table {path}: not JSON text ({e})") from None
    return parse_table(doc, f"block table {path}")


def cache_dir() -> pathlib.Path | None:
    """Where the tables tuned on this machine live (module docstring); None
    where neither variable is set and there is no home directory."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return pathlib.Path(root) / "block_tables"
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    except RuntimeError:  # no home directory
        return None
    return base / "ferrum-moe" / "block_tables"


_lookup_cache_dir: str | None = None  # cache_dir() as the lookups found it ("" for none); reread() forgets it


def _cache_for_lookup() -> str:
    global _lookup_cache_dir
    if _lookup_cache_dir is None:
        found = cache_dir()
        _lookup_cache_dir = "" if found is None else str(found)
    return _lookup_cache_dir


def _read_cached(path) -> dict:
    try:
        return read_table(path)
    except ValueError as e:
        warnings.warn(f"{e}; skipped (delete it: ferrum-moe tune writes a new one)", stacklevel=2)
        return {}


@functools.lru_cache(maxsize=None)
def _tables(env_value: str, cache: str) -> tuple[dict, ...]:
    """Every table in lookup order: the environment's, the tuned ones, then
    the shipped ones (read once per value of the variable and cache)."""
    tables = [read_table(p) for p in env_value.split(os.pathsep) if p]
    if cache:
        tables += [_read_cached(p) for p in sorted(pathlib.Path(cache).glob("*.json"))]
    return tuple(tables + [read_table(p) for p in sorted(SHIPPED.glob("*.json"))])


def reread() -> None:
    """Forgets the tables read so far and where the cache is (after a tuning
    run wrote one, or the cache variables changed)."""
    global _lookup_cache_dir
    _lookup_cache_dir = None
    _tables.cache_clear()
    _entry.cache_clear()


def best_block(times: dict[int, float], rule: int, margin: float) -> int:
    """The fastest block of a sweep (block -> time), or the rule's where it is
    within ``margin`` of it: a sweep's repeats differ by a few percent, so a
    table departs from the rule only where a block wins by more."""
    fastest = min(times, key=lambda b: (times[b], b))
    return rule if rule in times and times[rule] <= times[fastest] * (1 + margin) else fastest


@functools.lru_cache(maxsize=4096)
def _entry(env_value: str, cache: str, backend: str, description: str, layer: tuple):
    names = {description, *(field.strip() for field in description.split(","))}
    for table in _tables(env_value, cache):
        for (b, device, *key), entry in table.items():
            if b == backend and device in names and tuple(key) == layer:
                return entry
    return None


def measured_block_size(backend: str, description: str, experts: int, top_k: int, hidden: int, inter: int,
                        dtype: str, bits: int, group_size: int, num_tokens: int) -> int | None:
    """The measured block for this layer and token count, or None where no
    table has it (module docstring: which table, which count)."""
    env_value, cache = os.environ.get(ENV, ""), _cache_for_lookup()
    entry = None
    for dt in (dtype, *_SAME_TILES.get(dtype, ())):
        entry = _entry(env_value, cache, backend, description, (experts, top_k, hidden, inter, dt, bits, group_size))
        if entry is not None:
            break
    if entry is None:
        return None
    counts, blocks = entry
    at = bisect.bisect_left(counts, num_tokens)
    if at == len(counts):
        return None
    if counts[at] == num_tokens:
        return blocks[at]
    return blocks[at] if at > 0 and blocks[at - 1] == blocks[at] else None
