"""The plugin ABI's versioning rules (plugin.h), on copies of the CPU plugin's
own function table with their version fields and size changed: a newer minor
version loads, another major version or a truncated table is refused naming
the plugin and both versions, a 1.0 plugin (which knows no
FM_ALLOC_ZEROED) still hands out zero-filled new results, and a 1.1 plugin
(which knows no pair routing) gets align's routing from the layer, a 1.2
plugin (no gated epilogue) gets the activation run by the host, and a 1.4
plugin's whole-layer call is offered under pair routing after the steps'
checks, replacing the steps when it takes the call."""

import ctypes
from pathlib import Path

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe.arrays import import_array

from conftest import random_activations, random_weight, reference_moe, rel_error, silu_product
from handmade_dlpack import DLDataType, DLDevice, DLManagedTensorVersioned, DLTensor

POINTER_SIZE = ctypes.sizeof(ctypes.c_void_p)
FUNCTIONS = ["initialize", "destroy", "get_info", "tensor_alloc", "stack_create", "stack_destroy",
             "stack_get_properties", "stack_gemm_batched", "stack_gemm_routed", "stack_zero_workspace",
             "moe_align_block_size", "gated_activation", "moe_sum", "stream_order"]


class ApiHead(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("abi_major", ctypes.c_uint32), ("abi_minor", ctypes.c_uint32),
                ("name", ctypes.c_char_p), ("version", ctypes.c_char_p)]


class FmBackendApi(ctypes.Structure):
    _fields_ = ApiHead._fields_ + [(name, ctypes.c_void_p) for name in FUNCTIONS]


ABI_1_0_SIZE = ctypes.sizeof(FmBackendApi)  # the table of ABI 1.0 ends with stream_order
HOST_ABI = fm._core.build_info()["abi"].replace(".", r"\.")  # this ferrum-moe's, as a pattern

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def cpu_table() -> FmBackendApi:
    library = ctypes.CDLL(str(Path(fm._core.__file__).parent / "lib" / "libferrum_moe_cpu.so"))
    library.fm_backend_get_api.restype = ctypes.c_void_p
    return FmBackendApi.from_address(library.fm_backend_get_api())


# Every table made here, kept for the life of the process: a loaded backend
# holds a plain pointer to its table (a real plugin's lives in the library), and
# the backend may outlive the test that made it (its stacks, the core's release).
_TABLES = []


class Table:
    """A copy of the CPU plugin's table in a buffer of `struct_size` bytes
    (zero past the functions it knows), with the given version."""

    def __init__(self, *, major=1, minor=1, struct_size=ABI_1_0_SIZE):
        _TABLES.append(self)
        self.buffer = ctypes.create_string_buffer(max(struct_size, ABI_1_0_SIZE))
        self.api = FmBackendApi.from_buffer(self.buffer)
        ctypes.memmove(self.buffer, ctypes.addressof(cpu_table()), ABI_1_0_SIZE)
        self.api.struct_size, self.api.abi_major, self.api.abi_minor = struct_size, major, minor

    def capsule(self):
        return _capsule_new(ctypes.addressof(self.buffer), b"ferrum_moe.backend_api", None)

    def load(self):
        return fm._core.Backend.load(self.capsule())


def stack_on(backend, weights, dtype):
    """An fm.ExpertStack built on a Backend loaded outside discovery."""
    def arr(a, name):
        return import_array(np.ascontiguousarray(a), name)

    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    w = weights[0]
    qweight = np.stack([x.qweight for x in weights])
    scales = np.stack([x.scales for x in weights]).astype(np_dtype)
    zeros = np.stack([x.zeros() for x in weights]).astype(np.uint8)
    core = backend.create_stack(1, 0, dtype, len(weights), w.k, w.n, w.bits, w.group_size, arr(qweight, "qweight"),
                                arr(scales, "scales"), arr(zeros, "zeros"), None)
    return fm.ExpertStack(core)


def test_a_plugin_of_a_newer_minor_version_loads_and_computes(rng):
    table = Table(minor=7, struct_size=ABI_1_0_SIZE + 2 * POINTER_SIZE)  # two functions this host does not know
    backend = table.load()
    assert backend.abi_version == "1.7" and backend.name == "cpu"
    weights = [random_weight(rng, 128, 32, group_size=32, sym=False, dtype="float32") for _ in range(2)]
    x = random_activations(rng, (5, 128), "float32")
    y = stack_on(backend, weights, "float32").gemm_batched(x, [[1, 0, 0, 5]])
    assert rel_error(y, x.astype(np.float64) @ weights[1].dequantize(np.float64)) < 2e-5


@pytest.mark.parametrize("major", [0, 2])
def test_a_plugin_of_another_major_version_is_refused_naming_both(major):
    with pytest.raises(NotImplementedError, match=rf"plugin 'cpu' {fm.__version__} \(ABI {major}\.1\) is incompatible "
                                                  rf"with this ferrum-moe \(ABI {HOST_ABI}\): rebuild the plugin"):
        Table(major=major).load()


def test_a_truncated_table_is_refused_naming_the_plugin_and_both_versions():
    short = ABI_1_0_SIZE - POINTER_SIZE  # stream_order missing
    with pytest.raises(NotImplementedError, match=rf"plugin 'cpu' {fm.__version__} \(ABI 1\.1\) has a function table of "
                                                  rf"{short} bytes; ABI 1\.0 needs at least {ABI_1_0_SIZE} "
                                                  rf"\(this ferrum-moe \(ABI {HOST_ABI}\)\)"):
        Table(struct_size=short).load()
    with pytest.raises(NotImplementedError, match=r"plugin '\?' \? \(ABI 1\.1\) has a function table of 8 bytes"):
        Table(struct_size=8).load()  # too short to hold even its name


class FmTensorAllocArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("backend", ctypes.c_void_p), ("device", DLDevice),
                ("dtype", DLDataType), ("ndim", ctypes.c_int32), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("stream", ctypes.c_void_p), ("result", ctypes.POINTER(DLManagedTensorVersioned)),
                ("flags", ctypes.c_uint32)]


ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(FmTensorAllocArgs))


def test_a_1_0_plugin_gets_zero_filled_results_from_the_host(rng):
    """An ABI 1.0 allocator cannot know FM_ALLOC_ZEROED: this one fills every
    new tensor with 0xFF bytes (NaN in float16). The host zeroes host memory
    for it, so rows no dispatch writes still read zero."""
    table = Table(minor=0)
    real_alloc = ALLOC(table.api.tensor_alloc)

    def garbage_alloc(args):
        error = real_alloc(args)
        if error is None:
            a, t = args.contents, args.contents.result.contents.dl_tensor
            nbytes = int(np.prod([a.shape[i] for i in range(a.ndim)])) * (a.dtype.bits // 8)
            ctypes.memset(t.data, 0xFF, nbytes)
        return error

    table.keep = ALLOC(garbage_alloc)  # the table points into this callback: it lives as long
    table.api.tensor_alloc = ctypes.cast(table.keep, ctypes.c_void_p)
    backend = table.load()
    assert backend.abi_version == "1.0"
    assert np.all(np.isnan(np.from_dlpack(backend.empty(1, 0, "float16", [4, 4])))), "the allocator really is dirty"
    weights = [random_weight(rng, 64, 32, group_size=32) for _ in range(2)]
    x = random_activations(rng, (3, 64), "float16")
    y = stack_on(backend, weights, "float16").gemm_batched(x, [[1, 0, 2, 3]])
    assert y.shape == (5, 32) and np.all(y[:2] == 0)
    assert rel_error(y[2:], x.astype(np.float64) @ weights[1].dequantize(np.float64)) < 3e-3


def test_a_1_1_plugin_gets_no_pair_routing(rng):
    """Pair routing (ABI 1.2) is not asked of an older plugin: the layer aligns
    a single token's pairs for it, and a direct call says what is missing."""
    backend = Table(minor=1).load()
    assert not backend.has_pair_routing
    e, top_k, k, inter = 4, 2, 64, 32
    w13 = [random_weight(rng, k, 2 * inter, group_size=32, dtype="float32") for _ in range(e)]
    w2 = [random_weight(rng, inter, k, group_size=32, dtype="float32") for _ in range(e)]
    s13, s2 = stack_on(backend, w13, "float32"), stack_on(backend, w2, "float32")
    x = random_activations(rng, (1, k), "float32")
    ids = np.array([[3, 1]], dtype=np.int32)
    tw = rng.random((1, top_k)).astype(np.float32)
    assert rel_error(fm.fused_moe(x, s13, s2, tw, ids), reference_moe(x, w13, w2, tw, ids)) < 1e-4
    # Named pair routing aligns too, at the rule's block.
    x3, ids3 = random_activations(rng, (3, k), "float32"), np.array([[3, 1], [0, 3], [2, 1]], np.int32)
    tw3 = rng.random((3, top_k)).astype(np.float32)
    got = fm.fused_moe(x3, s13, s2, tw3, ids3, block_size=fm.routing.PAIR_ROUTING)
    assert rel_error(got, reference_moe(x3, w13, w2, tw3, ids3)) < 1e-4
    out = import_array(np.zeros((top_k, 2 * inter), np.float32), "out")
    with pytest.raises(NotImplementedError, match=r"gemm_routed: backend 'cpu' \(ABI 1\.1\) has no pair routing "
                                                  r"\(ABI 1\.2\): route the pairs with moe_align_block_size"):
        s13._core.gemm_routed_pairs(import_array(x, "x"), import_array(ids, "topk_ids"), e, None, None, out)


class FmHostServices(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("error_new", ctypes.c_void_p), ("host_alloc", ctypes.c_void_p),
                ("host_free", ctypes.c_void_p)]


class FmInitArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("services", ctypes.POINTER(FmHostServices)),
                ("backend", ctypes.c_void_p)]


class FmGemmRoutedArgsHead(ctypes.Structure):  # up to sorted_token_ids, all this test reads
    _fields_ = [("struct_size", ctypes.c_size_t), ("stack", ctypes.c_void_p), ("x", ctypes.c_void_p),
                ("sorted_token_ids", ctypes.c_void_p)]


INIT = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(FmInitArgs))
ROUTED = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(FmGemmRoutedArgsHead))
ERROR_NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)


class HookedTable(Table):
    """A Table whose functions named in `hooks` (name -> (prototype, fn(table,
    args))) are replaced by Python ones; `original[name]` calls the CPU
    plugin's, and `refuse(message)` makes the FM_ERROR_UNSUPPORTED error a
    plugin returns (through the services that initialize received)."""

    def __init__(self, *, minor, **hooks):
        super().__init__(minor=minor)
        self.original = {name: proto(getattr(self.api, name)) for name, (proto, _) in hooks.items()}
        real_init = INIT(self.api.initialize)

        def init(args):
            self.error_new = ERROR_NEW(args.contents.services.contents.error_new)
            return real_init(args)

        self.keep = {"initialize": INIT(init)}  # the table points into these callbacks: they live as long
        self.keep.update({name: proto(lambda args, fn=fn: fn(self, args)) for name, (proto, fn) in hooks.items()})
        for name, f in self.keep.items():
            setattr(self.api, name, ctypes.cast(f, ctypes.c_void_p))

    def refuse(self, message: bytes):
        return self.error_new(3, message)  # FM_ERROR_UNSUPPORTED


def one_token_layer(rng, backend):
    """A 4-expert float32 layer's weights, its stacks on `backend` and one
    token's x, topk_ids and topk_weights."""
    e, k, inter = 4, 64, 32
    w13 = [random_weight(rng, k, 2 * inter, group_size=32, dtype="float32") for _ in range(e)]
    w2 = [random_weight(rng, inter, k, group_size=32, dtype="float32") for _ in range(e)]
    x = random_activations(rng, (1, k), "float32")
    ids, tw = np.array([[2, 0]], np.int32), rng.random((1, 2)).astype(np.float32)
    return w13, w2, stack_on(backend, w13, "float32"), stack_on(backend, w2, "float32"), x, ids, tw


def test_a_1_2_plugin_that_refuses_pair_routing_gets_align(rng):
    """A plugin built against ABI 1.2 that does not implement pair routing
    raises FM_ERROR_UNSUPPORTED for it (plugins.md); the layer then aligns."""
    refused = []

    def routed(table, args):
        if args.contents.sorted_token_ids is None:
            refused.append(True)
            return table.refuse(b"no pair routing in this plugin")
        return table.original["stack_gemm_routed"](args)

    backend = HookedTable(minor=2, stack_gemm_routed=(ROUTED, routed)).load()
    assert backend.has_pair_routing
    w13, w2, s13, s2, x, ids, tw = one_token_layer(rng, backend)
    got = fm.fused_moe(x, s13, s2, tw, ids)
    assert refused, "the layer did not ask for pair routing"
    assert rel_error(got, reference_moe(x, w13, w2, tw, ids)) < 1e-4


class FmGatedActivationArgsHead(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t)]


ACTIVATION = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(FmGatedActivationArgsHead))


def test_a_later_steps_refusal_is_raised_once_not_retried_through_align(rng):
    """Only a refusal of pair routing itself sends a one-token layer to align:
    a plugin that refuses a later step (here the activation) gets the error,
    and the first GEMM is not run a second time."""
    routed_calls = []

    def routed(table, args):
        routed_calls.append(args.contents.sorted_token_ids is None)
        return table.original["stack_gemm_routed"](args)

    backend = HookedTable(minor=2, stack_gemm_routed=(ROUTED, routed),
                          gated_activation=(ACTIVATION, lambda table, args: table.refuse(
                              b"no activation in this plugin"))).load()
    _, _, s13, s2, x, ids, tw = one_token_layer(rng, backend)
    with pytest.raises(NotImplementedError, match="gated_activation: no activation in this plugin"):
        fm.fused_moe(x, s13, s2, tw, ids)
    assert routed_calls == [True], "one pair-routed GEMM, and no second run through align"


def gated_layer(rng, backend, inter):
    """A 4-expert float32 layer of intermediate size `inter` on `backend`, and
    3 tokens routed to 2 experts each."""
    e, k = 4, 64
    w13 = [random_weight(rng, k, 2 * inter, group_size=32, dtype="float32") for _ in range(e)]
    w2 = [random_weight(rng, inter, k, group_size=32, dtype="float32") for _ in range(e)]
    x = random_activations(rng, (3, k), "float32")
    ids = np.array([[2, 0], [1, 3], [0, 2]], np.int32)
    tw = rng.random((3, 2)).astype(np.float32)
    return w13, w2, stack_on(backend, w13, "float32"), stack_on(backend, w2, "float32"), x, ids, tw


def test_a_1_2_plugin_gets_the_activation_from_the_host(rng):
    """The gated epilogue (ABI 1.3) is not asked of an older plugin: the host
    runs the activation after its GEMM, in the layer and in gemm_routed."""
    backend = Table(minor=2).load()
    assert backend.has_pair_routing and not backend.has_gated_epilogue
    w13, w2, s13, s2, x, ids, tw = gated_layer(rng, backend, 64)
    assert rel_error(fm.fused_moe(x, s13, s2, tw, ids), reference_moe(x, w13, w2, tw, ids)) < 1e-4
    routing = fm.moe_align_block_size(ids, 4, 4)
    got = s13.gemm_routed(x, routing, activation="silu")
    for p in range(6):
        y = x[p // 2].astype(np.float64) @ w13[ids.flat[p]].dequantize(np.float64)
        assert rel_error(got[p], silu_product(y)) < 1e-4


@pytest.mark.parametrize("inter, epilogue", [(64, True), (32, False)])
def test_the_cpu_plugins_gated_epilogue_replaces_the_activation_step(rng, inter, epilogue):
    """A 1.3 CPU plugin writes silu(gate) * up in its GEMM where the gate's
    columns are whole 64-column blocks: the layer then runs no activation step;
    elsewhere it runs one, and both agree with the float64 layer."""
    steps = []

    def activation(table, args):
        steps.append("activation")
        return table.original["gated_activation"](args)

    backend = HookedTable(minor=3, gated_activation=(ACTIVATION, activation)).load()
    assert backend.has_gated_epilogue
    w13, w2, s13, s2, x, ids, tw = gated_layer(rng, backend, inter)
    for block_size in (None, 4):  # pair routing for one token, then align's blocks
        steps.clear()
        got = fm.fused_moe(x[:1], s13, s2, tw[:1], ids[:1], block_size=block_size)
        assert rel_error(got, reference_moe(x[:1], w13, w2, tw[:1], ids[:1])) < 1e-4
        assert steps == ([] if epilogue else ["activation"])


class FmMoeLayerArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("backend", ctypes.c_void_p), ("w13", ctypes.c_void_p),
                ("w2", ctypes.c_void_p), ("x", ctypes.POINTER(DLTensor)), ("topk_ids", ctypes.POINTER(DLTensor)),
                ("topk_weights", ctypes.POINTER(DLTensor)), ("weights_on_input", ctypes.c_int32),
                ("num_experts", ctypes.c_int64), ("expert_map", ctypes.POINTER(DLTensor)),
                ("activation", ctypes.c_int), ("act", ctypes.POINTER(DLTensor)), ("down", ctypes.POINTER(DLTensor)),
                ("out", ctypes.POINTER(DLTensor)), ("stream", ctypes.c_void_p), ("written", ctypes.c_int32)]


LAYER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(FmMoeLayerArgs))
ABI_1_4_SIZE = ABI_1_0_SIZE + POINTER_SIZE  # moe_layer appended after stream_order


def shape_of(t: DLTensor) -> tuple:
    return tuple(t.shape[i] for i in range(t.ndim))


def layer_table(moe_layer, **hooks):
    """A 1.4 copy of the CPU plugin's table whose moe_layer is `moe_layer(args)`
    (a Python function answering an FmError pointer or None), and whose GEMMs
    and top-k sum, counted in `table.steps`, are the CPU plugin's."""
    table = HookedTable(minor=4, stack_gemm_routed=(ROUTED, lambda t, a: (t.steps.append("gemm_routed"),
                                                                          t.original["stack_gemm_routed"](a))[1]),
                        **hooks)
    table.steps = []
    bigger = ctypes.create_string_buffer(ABI_1_4_SIZE)
    ctypes.memmove(bigger, table.buffer, ABI_1_0_SIZE)
    table.buffer, table.api = bigger, FmBackendApi.from_buffer(bigger)
    table.api.struct_size = ABI_1_4_SIZE
    table.keep["moe_layer"] = LAYER(moe_layer)
    ctypes.c_void_p.from_buffer(bigger, ABI_1_0_SIZE).value = ctypes.cast(table.keep["moe_layer"], ctypes.c_void_p).value
    return table


def test_the_cpu_plugin_offers_no_fused_layer():
    """A plugin.hpp backend that declares no moe_layer (the CPU one) leaves the
    1.4 entry NULL, so the host never builds the call for it."""
    library_table = cpu_table()
    assert library_table.abi_minor >= 4 and library_table.struct_size >= ABI_1_4_SIZE
    assert ctypes.c_void_p.from_address(ctypes.addressof(library_table) + ABI_1_0_SIZE).value is None
    assert not fm.discovery.get_backend("cpu").has_moe_layer


def test_the_fused_layer_is_asked_only_of_a_1_4_table_that_holds_it():
    """The call is built only for a plugin of minor version >= 4 whose table
    is long enough to hold moe_layer and holds a function there."""
    def layer(args):
        return None

    short = Table(minor=4)  # a 1.4 version number on a 1.0-sized table
    assert not short.load().has_moe_layer
    older = layer_table(layer)
    older.api.abi_minor = 3  # the entry filled, the version older
    assert not older.load().has_moe_layer
    assert layer_table(layer).load().has_moe_layer


@pytest.mark.parametrize("on_input", [False, True])
def test_a_plugin_that_declines_the_fused_layer_gets_the_steps(rng, on_input):
    """The host offers the whole layer (ABI 1.4) under pair routing, after the
    steps' checks, with the steps' buffers as scratch; a plugin that answers
    written = 0 queued nothing, and the host runs the steps."""
    seen = []

    def decline(args):
        a = args.contents
        seen.append({"x": shape_of(a.x.contents), "ids": shape_of(a.topk_ids.contents),
                     "act": shape_of(a.act.contents), "down": shape_of(a.down.contents),
                     "down_bits": a.down.contents.dtype.bits, "out": shape_of(a.out.contents),
                     "on_input": a.weights_on_input, "experts": a.num_experts, "activation": a.activation,
                     "map": bool(a.expert_map)})
        a.written = 0
        return None

    table = layer_table(decline)
    backend = table.load()
    assert backend.has_moe_layer
    w13, w2, s13, s2, x, ids, tw = gated_layer(rng, backend, 64)
    got = fm.fused_moe(x[:1], s13, s2, tw[:1], ids[:1], apply_router_weight_on_input=on_input)
    assert rel_error(got, reference_moe(x[:1], w13, w2, tw[:1], ids[:1], on_input=on_input)) < 1e-4
    assert seen == [{"x": (1, 64), "ids": (1, 2), "act": (2, 64), "down": (2, 64), "down_bits": 32, "out": (1, 64),
                     "on_input": int(on_input), "experts": 4, "activation": 0, "map": False}]
    assert table.steps == ["gemm_routed", "gemm_routed"]
    # Align's routing (a block size named) is never offered as one call.
    seen.clear()
    table.steps.clear()
    got = fm.fused_moe(x, s13, s2, tw, ids, block_size=4)
    assert rel_error(got, reference_moe(x, w13, w2, tw, ids)) < 1e-4
    assert seen == [] and table.steps == ["gemm_routed", "gemm_routed"]


def test_a_plugin_that_takes_the_fused_layer_replaces_every_step(rng):
    """A plugin that answers written = 1 has queued the whole layer: the host
    runs no step after it, and the layer's result is what the plugin wrote
    (here the float64 layer, written through the out DLTensor it received)."""
    expected, seen = {}, []

    def take(args):
        # (An exception here would be swallowed by ctypes: what the call saw is
        # recorded and checked after it.)
        a = args.contents
        out = a.out.contents
        compact = not out.strides or (out.strides[0] == out.shape[1] and out.strides[1] == 1)
        seen.append((shape_of(out), compact, (out.dtype.code, out.dtype.bits)))
        if compact and shape_of(out) == expected["value"].shape:
            value = np.ascontiguousarray(expected["value"], np.float32)
            ctypes.memmove(out.data + out.byte_offset, value.ctypes.data, value.nbytes)
        a.written = 1
        return None

    sums = []
    table = layer_table(take, moe_sum=(ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p),
                                        lambda t, a: (sums.append(1), t.original["moe_sum"](a))[1]))
    backend = table.load()
    w13, w2, s13, s2, x, ids, tw = gated_layer(rng, backend, 64)
    expected["value"] = reference_moe(x[:1], w13, w2, tw[:1], ids[:1])
    got = fm.fused_moe(x[:1], s13, s2, tw[:1], ids[:1])
    assert seen == [((1, 64), True, (2, 32))]  # out: float32 [1, hidden], compact
    np.testing.assert_array_equal(got, expected["value"].astype(np.float32))
    assert table.steps == [] and sums == []


def test_the_fused_layer_is_offered_only_after_the_steps_checks(rng, monkeypatch):
    """Bad arguments are refused with the steps' messages before the plugin's
    moe_layer sees them."""
    offered = []

    def record(args):
        offered.append(1)
        args.contents.written = 0
        return None

    backend = layer_table(record).load()
    _, _, s13, s2, x, ids, tw = gated_layer(rng, backend, 64)
    with pytest.raises(ValueError, match=r"gemm_routed: x has shape \[1, 32\]; dimension 1 must be 64 \(the stack's k\)"):
        fm.fused_moe(x[:1, :32], s13, s2, tw[:1], ids[:1])
    # An out the top-k sum refuses (the last step's check), with the steps' message either way.
    messages = []
    for layer_call in ("1", "0"):
        monkeypatch.setenv("FERRUM_MOE_LAYER_CALL", layer_call)
        with pytest.raises(ValueError) as refused:
            fm.fused_moe(x[:1], s13, s2, tw[:1], ids[:1], out=np.zeros((1, 32), np.float32))
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and messages[0].startswith("moe_sum: out"), messages
    assert offered == []


def test_ferrum_moe_layer_call_0_keeps_the_steps(rng, monkeypatch):
    """FERRUM_MOE_LAYER_CALL=0 (an escape hatch, and a way to time the steps
    against the one call in one process): the host never offers the call."""
    offered = []

    def take(args):
        offered.append(1)
        args.contents.written = 1  # (it would claim the layer without computing it)
        return None

    table = layer_table(take)
    backend = table.load()
    w13, w2, s13, s2, x, ids, tw = gated_layer(rng, backend, 64)
    monkeypatch.setenv("FERRUM_MOE_LAYER_CALL", "0")
    got = fm.fused_moe(x[:1], s13, s2, tw[:1], ids[:1])
    assert offered == [] and table.steps == ["gemm_routed", "gemm_routed"]
    assert rel_error(got, reference_moe(x[:1], w13, w2, tw[:1], ids[:1])) < 1e-4
    monkeypatch.setenv("FERRUM_MOE_LAYER_CALL", "1")
    fm.fused_moe(x[:1], s13, s2, tw[:1], ids[:1])
    assert offered == [1]
