"""A published model directory on disk: config.json, the quantization config,
and the tensors of its .safetensors files (one file, several found by name, or
shards listed by model.safetensors.index.json).

Every shard's header is checked before any tensor data is read: its length
against the file, every tensor's dtype, shape and data offsets against each
other and against the file's size, so a truncated file or a header that lies
is refused with the file and tensor named, before anything is allocated. Data
is read through the ``safetensors`` package, memory-mapped, one tensor at a
time and only when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401  registers numpy's "bfloat16", which safetensors' numpy reader asks for
import numpy as np

from ._checks import MAX_GROUP_SIZE

INDEX_FILE = "model.safetensors.index.json"
# safetensors' own limit: a larger header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def quote(value) -> str:
    """repr() of a value read from a file, cut short: a message of the loader
    quotes what it found, not all of it."""
    return _REPR.repr(value)


def _cut(name: str, limit: int = 200) -> str:
    """A tensor name as messages quote it: past ``limit`` characters (no real
    tensor's name is that long) only its two ends."""
    return name if len(name) <= limit else f"{name[:limit // 2]}...({len(name)} characters)...{name[-limit // 4:]}"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded as it is; the message names the
    file (and the tensor) and says what was expected and what was found."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor as a shard's header declares it (checked against the file)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def where(self) -> str:
        return f"{self.file}: tensor {_cut(self.name)}"


def _parse_json(raw: bytes, where, what: str):
    """JSON text as the standard defines it (UTF-8); every way it can fail is a
    CheckpointError naming ``where``, including nesting past Python's recursion
    limit and integers past its limit on digits."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: {what} is not UTF-8 text: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: {what} nests JSON arrays or objects too deeply to be read") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than int() converts
        raise CheckpointError(f"{where}: {what} is not valid JSON: {e}") from None


def _read_json(path: Path, what: str) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: is {path.parent} a model directory?") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what}: {e}") from None
    value = _parse_json(raw, path, f"the {what}")
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object; got {type(value).__name__}")
    return value


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a .safetensors file declares, each checked against the file
    before any data is read: known dtype, shape x dtype size = the byte span of
    its data offsets, spans inside the file and not overlapping."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: {size} bytes, shorter than the 8-byte header length: not a "
                                      "safetensors file, or truncated")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{file}: the header claims {header_len} bytes but the file has {size - 8} after the length "
                    f"(and headers are limited to {MAX_HEADER_BYTES}): truncated or not a safetensors file")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from None
    header = _parse_json(raw, file, "the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header must be a JSON object; got {type(header).__name__}")
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor {_cut(name)}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: the header entry must hold dtype, shape and data_offsets; got "
                                  f"{quote(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where}: dtype must be a string such as \"F16\"; got {quote(dtype)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers; got {quote(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; got "
                                  f"{quote(offsets)}")
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(f"{where}: its data ends at byte {end} of the data section, but the file holds "
                                  f"only {data_len} bytes of data: the file is truncated or its header is wrong")
        if dtype not in DTYPE_BYTES:
            # Other dtypes (4- or 6-bit floats, ...) are never read here; safetensors checks their sizes.
            nbytes = end - begin
        else:
            nbytes = _nbytes(shape, DTYPE_BYTES[dtype])
            if nbytes != end - begin:
                needs = "more than 2^64" if nbytes is None else str(nbytes)
                raise CheckpointError(f"{where}: shape {quote(shape)} of {dtype} needs {needs} bytes, but its "
                                      f"data_offsets [{begin}, {end}] span {end - begin}: the header is wrong")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, file, dtype, tuple(shape), nbytes)
    metadata = header.get("__metadata__")
    if metadata is not None and (not isinstance(metadata, dict) or
                                 not all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: the header's __metadata__ must map names to strings (safetensors refuses "
                              f"anything else); got {quote(metadata)}")
    # safetensors reads a file only if its tensors tile the data section: sorted
    # by offset, each starts where the one before ends, the last ends at its end.
    spans.sort()
    covered, prev = 0, None
    for begin, end, name in spans:
        if begin < covered:
            raise CheckpointError(f"{file}: tensor {_cut(name)} starts at byte {begin}, inside tensor {_cut(prev)} "
                                  f"(which ends at {covered}): the header is wrong")
        if begin > covered:
            raise CheckpointError(f"{file}: bytes {covered} to {begin} of the data section belong to no tensor (a "
                                  f"gap before tensor {_cut(name)}): the header is wrong")
        covered, prev = end, name
    if covered != data_len:
        raise CheckpointError(f"{file}: the data section holds {data_len} bytes, but its tensors end at byte "
                              f"{covered}: bytes were added to the file, or its header is wrong")
    return tensors


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """The bytes of a tensor of ``shape``, or None past 2^64 (no file holds
    that many): the product of a long list of huge dimensions takes time
    quadratic in its digits, so it stops at the first factor that passes."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > 2**64:
            return None
    return n


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's weights are quantized, as its quantization config says.

    method "gptq" (checkpoint_format "gptq": v1, zero - 1 stored; or "gptq_v2"),
    "awq" (AutoAWQ's gemm layout, 4-bit, zero points; checkpoint_format "awq")
    or "compressed-tensors" (llm-compressor's pack-quantized weight-only int
    layout; checkpoint_format its "format": each module's scheme comes from
    for_module). modules_to_not_convert: GPTQ's
    and AWQ's entries match whole dotted parts of a module's name;
    compressed-tensors' ``ignore`` entries match the whole name, or with "re:"
    a regular expression from its start.
    """

    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str
    modules_to_not_convert: tuple[str, ...]
    source: str
    # compressed-tensors: its config groups, (name, targets, group) each; a
    # module's scheme is its group's (for_module). Empty for GPTQ and AWQ.
    groups: tuple = ()

    def for_module(self, module: str) -> "QuantConfig":
        """The scheme that quantizes ``module``: the checkpoint's for GPTQ and
        AWQ; for compressed-tensors, that of the config group whose targets
        match it, checked to be one ferrum-moe runs."""
        if self.method != "compressed-tensors":
            return self
        schemes: dict[tuple, list[str]] = {}
        for name, targets, group in self.groups:
            if any(_matches(t, module) for t in targets):
                at = f"{self.source}: config_groups.{name} (which targets {module})"
                schemes.setdefault(_weight_scheme(group, self.checkpoint_format, at), []).append(name)
        if not schemes:
            raise CheckpointError(f"{self.source}: no config_groups target matches {module}, so the checkpoint does "
                                  "not say how it is quantized")
        if len(schemes) > 1:
            shown = "; ".join(f"{', '.join(names)}: int{b}, group {g}, {'sym' if sym else 'asym'}, act-order "
                              f"{str(act).lower()}" for (b, g, sym, act), names in schemes.items())
            raise CheckpointError(f"{self.source}: config groups with different weight schemes all target {module} "
                                  f"({shown})")
        (bits, group_size, sym, act_order), = schemes
        return dataclasses.replace(self, bits=bits, group_size=group_size, sym=sym, desc_act=act_order)

    def describe(self) -> str:
        group = "per column (group_size -1)" if self.group_size == -1 else f"group {self.group_size}"
        if self.method == "awq":
            return f"AWQ {self.bits}-bit, {group}, zero points, version gemm"
        if self.method == "compressed-tensors":
            if not self.bits:  # the checkpoint's config, before a module chose its group
                return f"compressed-tensors {self.checkpoint_format}, config groups {', '.join(n for n, _, _ in self.groups)}"
            return (f"compressed-tensors pack-quantized int{self.bits}, {group}, "
                    f"{'symmetric' if self.sym else 'zero points'}{', act-order' if self.desc_act else ''}")
        return (f"GPTQ {self.bits}-bit, {group}, {'sym' if self.sym else 'asym (zero points)'}, "
                f"desc_act {str(self.desc_act).lower()}, checkpoint_format {self.checkpoint_format}")

    def not_converted_by(self, module: str) -> str | None:
        """The modules_to_not_convert entry that covers ``module``, if any. An
        entry covers a module when its dotted parts appear in the module's name
        as whole parts ("gate" covers "mlp.gate" but not "mlp.gate_proj")."""
        parts = module.split(".")
        for entry in self.modules_to_not_convert:
            if self.method == "compressed-tensors":
                if _matches(entry, module):
                    return entry
                continue
            want = entry.split(".")
            if any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
                return entry
        return None


def _quant_config(directory: Path, config: dict) -> QuantConfig:
    if "quantization_config" in config:
        q, source = config["quantization_config"], f"quantization_config in {directory / 'config.json'}"
    elif (directory / "quantize_config.json").exists():
        q, source = _read_json(directory / "quantize_config.json", "quantization config"), \
            str(directory / "quantize_config.json")
    else:
        raise CheckpointError(f"{directory}: config.json has no quantization_config and there is no "
                              "quantize_config.json: ferrum-moe loads GPTQ-, AWQ- and compressed-tensors-quantized checkpoints")
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: must be a JSON object; got {type(q).__name__}")

    def field(key, kind, default=None, required=False):
        if key not in q or q[key] is None:
            if required:
                raise CheckpointError(f"{source}: {key} is missing")
            return default
        value = q[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)) or \
                kind is bool and not isinstance(value, bool) or kind is str and not isinstance(value, str):
            wanted = {int: "an integer", bool: "true or false", str: "a string"}[kind]
            raise CheckpointError(f"{source}: {key} must be {wanted}; got {quote(value)}")
        return value

    method = field("quant_method", str, "gptq").lower()  # quantize_config.json predates quant_method
    if method == "compressed-tensors":
        return _compressed_tensors_config(q, source)
    bits = field("bits", int, required=True)
    group_size = field("group_size", int, required=True)
    not_convert = field("modules_to_not_convert", list, [])
    if not isinstance(not_convert, list) or not all(isinstance(m, str) for m in not_convert):
        raise CheckpointError(f"{source}: modules_to_not_convert must be a list of module names; got "
                              f"{quote(not_convert)}")
    if group_size != -1 and group_size < 1:
        raise CheckpointError(f"{source}: group_size must be -1 or positive; got {group_size}")
    if group_size > MAX_GROUP_SIZE:
        raise CheckpointError(f"{source}: group_size must be at most {MAX_GROUP_SIZE} (any size >= K is one group); "
                              f"got {group_size}")
    if method == "gptq":
        if bits not in (4, 8):
            raise CheckpointError(f"{source}: bits must be 4 or 8 (the GPTQ widths ferrum-moe runs); got {bits}")
        fmt = field("checkpoint_format", str, "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{source}: checkpoint_format {quote(fmt)} is not supported (expected 'gptq' or "
                                  "'gptq_v2'): re-export the model in GPTQ format")
        return QuantConfig("gptq", bits, group_size, field("sym", bool, True), field("desc_act", bool, False), fmt,
                           tuple(not_convert), source)
    if method == "awq":
        if bits != 4:
            raise CheckpointError(f"{source}: AWQ bits must be 4; got {bits}")
        version = field("version", str, "gemm")
        if version.lower() != "gemm":
            raise CheckpointError(f"{source}: AWQ version {quote(version)} is not supported: only 'gemm' checkpoints "
                                  "(qweight [K, N/8]) are read")
        if not field("zero_point", bool, True):
            raise CheckpointError(f"{source}: AWQ zero_point false is not supported (AWQ gemm checkpoints carry "
                                  "zero points)")
        return QuantConfig("awq", 4, group_size, False, False, "awq", tuple(not_convert), source)
    raise CheckpointError(f"{source}: quant_method {quote(method)} is not supported: ferrum-moe loads 'gptq', 'awq' "
                          "and 'compressed-tensors'")


# compressed-tensors' actorder values ("dynamic" is its alias of "group"): whether rows carry a g_idx.
_ACTORDER = {None: False, False: False, "weight": False, "static": False, "group": True, "dynamic": True, True: True}


def _compressed_tensors_config(q: dict, source: str) -> QuantConfig:
    """llm-compressor's checkpoints. The config groups are kept as written and
    each module takes the scheme of the group whose targets match it
    (QuantConfig.for_module), so attention quantized some other way (FP8, W8A8)
    does not stop the experts loading; the experts' own scheme must be
    weight-only int, pack-quantized."""
    fmt = q.get("format")
    if fmt not in ("pack-quantized", "mixed-precision"):
        raise CheckpointError(f"{source}: compressed-tensors format {quote(fmt)} is not supported: ferrum-moe reads "
                              "'pack-quantized' (int4/int8 weights packed into int32, as W4A16 and W8A16 are saved), "
                              "alone or in 'mixed-precision'")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{source}: config_groups must be a non-empty object of quantization schemes; got "
                              f"{quote(groups)}")
    kept = []
    for name, group in groups.items():
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise CheckpointError(f"{source}: config_groups.{name} must be an object with 'targets', a list of module "
                                  f"names, patterns or class names; got {quote(group)}")
        _check_patterns(targets, f"{source}: config_groups.{name}.targets")
        kept.append((name, tuple(targets), group))
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(m, str) for m in ignore):
        raise CheckpointError(f"{source}: ignore must be a list of module names; got {quote(ignore)}")
    _check_patterns(ignore, f"{source}: ignore")
    return QuantConfig("compressed-tensors", 0, 0, True, False, fmt, tuple(ignore), source, tuple(kept))


def _check_patterns(entries: list[str], where: str) -> None:
    for entry in entries:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise CheckpointError(f"{where}: entry {quote(entry)} is not a regular expression ({e})") from None


def _matches(entry: str, module: str) -> bool:
    """compressed-tensors' rule: "re:" and a pattern matched from the name's
    start, else the whole name, or a class name (every projection is a Linear)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry in (module, "Linear")


def _weight_scheme(group: dict, fmt: str, at: str) -> tuple[int, int, bool, bool]:
    """(bits, group_size, symmetric, act-order) of a config group that
    quantizes an expert: weight-only int, pack-quantized."""
    if group.get("input_activations") is not None or group.get("output_activations") is not None:
        raise CheckpointError(f"{at} quantizes activations too; ferrum-moe runs weight-only schemes (W4A16, W8A16)")
    fmt = group.get("format") or fmt
    if fmt != "pack-quantized":
        raise CheckpointError(f"{at}: format {quote(fmt)} is not supported (expected 'pack-quantized')")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise CheckpointError(f"{at}.weights must be an object (the weight scheme); got {quote(w)}")
    bits, kind = w.get("num_bits"), w.get("type", "int")
    if bits not in (4, 8) or isinstance(bits, bool) or kind != "int":
        raise CheckpointError(f"{at}.weights: {quote(kind)} with num_bits {quote(bits)} is not supported: ferrum-moe "
                              "runs int weights of 4 or 8 bits")
    group_size, strategy = w.get("group_size"), w.get("strategy")
    if strategy is None and isinstance(group_size, int) and not isinstance(group_size, bool):
        strategy = "group" if group_size > 0 else "channel" if group_size == -1 else None  # as compressed-tensors infers
    if strategy == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
            raise CheckpointError(f"{at}.weights: group_size must be a positive integer for strategy 'group'; got "
                                  f"{quote(group_size)}")
    elif strategy == "channel":
        group_size = -1  # one scale per output column
    else:
        raise CheckpointError(f"{at}.weights: strategy {quote(strategy)} is not supported (expected 'group' or "
                              "'channel')")
    sym = w.get("symmetric", True)
    if not isinstance(sym, bool) or w.get("dynamic", False) is not False:
        raise CheckpointError(f"{at}.weights: symmetric must be true or false and dynamic false; got symmetric "
                              f"{quote(sym)}, dynamic {quote(w.get('dynamic'))}")
    actorder = w.get("actorder")
    if not isinstance(actorder, (str, bool, type(None))) or actorder not in _ACTORDER:
        raise CheckpointError(f"{at}.weights: actorder {quote(actorder)} is not supported (expected null, 'group', "
                              "'dynamic', 'weight' or 'static')")
    return bits, group_size, sym, _ACTORDER[actorder]


class Checkpoint:
    """A model directory: ``config``, ``quant`` (QuantConfig) and its tensors.

    Shard headers are read lazily (only the shards holding asked-for tensors)
    when an index maps names to shards; without an index every .safetensors
    file's header is read to find the names. Use as a context manager, or call
    close(), to release the memory maps."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a model directory with config.json and "
                                  ".safetensors files)")
        self.config = _read_json(self.path / "config.json", "config.json")
        self.quant = _quant_config(self.path, self.config)
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self._handles: dict[Path, object] = {}
        index = self.path / INDEX_FILE
        if index.exists():
            self.index_file: Path | None = index
            self._weight_map = self._read_index(index)
        else:
            self.index_file = None
            self._weight_map = {}
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no .safetensors files (and no {INDEX_FILE})")
            for file in files:
                for name in self._header(file):
                    if name in self._weight_map:
                        raise CheckpointError(f"{file}: tensor {_cut(name)} is also in {self._weight_map[name]}: "
                                              "which one is meant is ambiguous")
                    self._weight_map[name] = file

    def _read_index(self, index: Path) -> dict[str, Path]:
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names; got "
                                  f"{quote(weight_map)}")
        shards = {}
        for shard in sorted(set(weight_map.values())):
            relative = Path(shard)
            if relative.is_absolute() or ".." in relative.parts:
                raise CheckpointError(f"{index}: shard {quote(shard)} lies outside the model directory")
            file = self.path / relative
            if not file.is_file():
                count = sum(v == shard for v in weight_map.values())
                raise CheckpointError(f"{index}: names shard {shard} ({count} tensors), but {file} does not exist "
                                      "(an incomplete download?)")
            shards[shard] = file
        return {name: shards[shard] for name, shard in weight_map.items()}

    def _header(self, file: Path) -> dict[str, TensorInfo]:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._weight_map.values()))

    def names(self) -> list[str]:
        return list(self._weight_map)

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def info(self, name: str) -> TensorInfo:
        """The header entry of ``name``; CheckpointError if no file holds it."""
        file = self._weight_map.get(name)
        if file is None:
            if self.index_file:
                raise CheckpointError(f"{self.index_file}: missing tensor {name} (the index does not list it)")
            raise CheckpointError(f"{self.path}: missing tensor {name} (in none of: "
                                  f"{', '.join(f.name for f in self.files)})")
        info = self._header(file).get(name)
        if info is None:
            raise CheckpointError(f"{self.index_file}: maps tensor {name} to {file.name}, whose header has no such "
                                  "tensor")
        return info

    def expect(self, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...], meaning: str) -> TensorInfo:
        """The header entry of ``name``, checked to have one of ``dtypes`` and ``shape``."""
        info = self.info(name)
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.where()}: expected dtype {' or '.join(dtypes)} ({meaning}); got {info.dtype}")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.where()}: expected shape {list(shape)} ({meaning}); got {list(info.shape)}")
        return info

    def read(self, info: TensorInfo) -> np.ndarray:
        """The data of one tensor (its header entry already checked)."""
        from safetensors import safe_open

        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="numpy")
            array = handle.get_tensor(info.name)
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or TypeError
            raise CheckpointError(f"{info.where()}: cannot be read: {type(e).__name__}: {e}") from None
        if array.shape != info.shape:
            raise CheckpointError(f"{info.where()}: read shape {list(array.shape)}; its header says {list(info.shape)}")
        return array

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
