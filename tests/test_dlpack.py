"""DLPack: zero-copy import from numpy and PyTorch, ferrum Tensors exported to
both, capsule ownership (consumed once, deleters run, nothing leaks)."""

import ctypes
import sys

import ml_dtypes
import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe.arrays import import_array, to_caller

torch = pytest.importorskip("torch")

DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "uint8"]
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
         "int64": torch.int64, "uint8": torch.uint8}
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "int32": np.int32,
         "int64": np.int64, "uint8": np.uint8}

_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]


def numpy_array(rng, shape, dtype):
    return (rng.standard_normal(shape) * 50).astype(NUMPY[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_round_trip_is_zero_copy(rng, dtype):
    a = numpy_array(rng, (5, 7), dtype)
    t = import_array(a, "a")
    assert t.dtype == dtype and t.shape == (5, 7) and t.data_ptr == a.ctypes.data
    back = to_caller(t, a)
    assert back.dtype == a.dtype and back.ctypes.data == a.ctypes.data
    np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_round_trip_is_zero_copy(rng, dtype):
    a = torch.from_numpy(numpy_array(rng, (4, 6), dtype if dtype != "bfloat16" else "float32")).to(TORCH[dtype])
    t = import_array(a, "a")
    assert t.dtype == dtype and t.shape == (4, 6) and t.data_ptr == a.data_ptr()
    back = to_caller(t, a)
    assert isinstance(back, torch.Tensor) and back.dtype == a.dtype and back.data_ptr() == a.data_ptr()
    assert torch.equal(back, a)


def test_plain_torch_tensors_skip_the_protocols_python_subclasses_keep_it(rng, monkeypatch):
    """A plain CPU tensor is exported through PyTorch's C export (the Python of its
    __dlpack__ and __dlpack_device__ is most of an import's cost); a subclass, which
    may override the protocol, and a tensor that needs a gradient go through it."""
    a = torch.from_numpy(numpy_array(rng, (3, 5), "float32"))[:, 1:]

    class Marked(torch.Tensor):
        pass

    def refuse(*args, **kwargs):
        raise AssertionError("the protocol ran")

    monkeypatch.setattr(torch.Tensor, "__dlpack__", refuse)
    t = import_array(a, "a")
    assert t.data_ptr == a.data_ptr() and t.shape == (3, 4) and t.strides == (5, 1)
    np.testing.assert_array_equal(np.from_dlpack(t), a.numpy())
    with pytest.raises(AssertionError, match="the protocol ran"):
        import_array(a.as_subclass(Marked), "b")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="^g: .*gradient"):
        import_array(torch.zeros(2, 3, requires_grad=True), "g")


def test_strided_and_sliced_views_keep_their_layout(rng):
    base = numpy_array(rng, (10, 12), "float32")
    view = base[2::3, 1:9:2]
    t = import_array(view, "view")
    assert t.shape == (3, 4)
    assert t.strides == (36, 2)  # elements, not bytes
    assert t.data_ptr == view.ctypes.data
    assert not t.is_compact
    np.testing.assert_array_equal(np.from_dlpack(t), view)
    tv = torch.from_numpy(base)[3:, 2:]
    tt = import_array(tv, "tv")
    assert tt.data_ptr == tv.data_ptr()
    assert torch.equal(torch.from_dlpack(tt), tv)


def test_byte_offset_is_honoured(rng):
    base = torch.from_numpy(numpy_array(rng, (16,), "float32"))
    tail = base[5:]
    t = import_array(tail, "tail")
    assert t.data_ptr == tail.data_ptr()
    np.testing.assert_array_equal(np.from_dlpack(t), tail.numpy())


def test_read_only_numpy_arrays_are_flagged_and_refused_as_out(rng):
    x = numpy_array(rng, (2, 32), "float32")
    x.flags.writeable = False
    assert import_array(x, "x").read_only
    w = fm.gptq.quantize(rng.standard_normal((32, 16)), 4, 32, scale_dtype=np.float32)
    lin = fm.Linear.from_gptq(w, dtype="float32")
    out = np.zeros((2, 16), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        lin(np.ones((2, 32), np.float32), out=out)


def test_numpy_bfloat16_imports_through_ml_dtypes(rng):
    a = numpy_array(rng, (3, 3), "bfloat16")
    t = import_array(a, "a")
    assert t.dtype == "bfloat16" and t.data_ptr == a.ctypes.data
    back = to_caller(t, a)
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.view(np.uint16), a.view(np.uint16))


def test_numpy_subclasses_import_like_numpy(rng, tmp_path):
    """numpy arrays take a shorter path than other producers (no device to ask,
    no stream to order): subclasses, memory maps and their bfloat16 too."""
    a = numpy_array(rng, (3, 4), "bfloat16")
    mapped = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=(3, 4))
    mapped[:] = numpy_array(rng, (3, 4), "float32")
    for array, dtype in ((a.view(np.recarray), "bfloat16"), (mapped, "float32"),
                         (mapped.view(np.uint32).view(ml_dtypes.bfloat16)[:, ::2], "bfloat16")):
        t = import_array(array, "a")
        assert (t.dtype, t.shape, t.data_ptr) == (dtype, array.shape, array.ctypes.data)
        np.testing.assert_array_equal(np.from_dlpack(t.retyped("uint16") if dtype == "bfloat16" else t),
                                      array.view(np.uint16) if dtype == "bfloat16" else array)


def test_a_capsule_is_consumed_once(rng):
    a = numpy_array(rng, (4,), "float32")
    capsule = a.__dlpack__()
    fm.Tensor.from_capsule(capsule)
    assert _get_name(capsule) == b"used_dltensor"
    with pytest.raises(ValueError, match="already consumed"):
        fm.Tensor.from_capsule(capsule)


def test_foreign_capsules_are_refused():
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype = ctypes.py_object
    capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    other = capsule(ctypes.c_void_p(8), b"not_a_tensor", None)
    with pytest.raises(TypeError, match="expected a DLPack capsule named 'dltensor_versioned' or 'dltensor'; got 'not_a_tensor'"):
        fm.Tensor.from_capsule(other)


def test_export_offers_both_capsule_kinds(rng):
    t = import_array(numpy_array(rng, (2, 2), "float32"), "a")
    assert _get_name(t.__dlpack__()) == b"dltensor"  # legacy, as JAX asks
    assert _get_name(t.__dlpack__(max_version=(1, 1))) == b"dltensor_versioned"
    assert t.__dlpack_device__() == (1, 0)


def test_import_and_export_release_every_reference(rng):
    a = numpy_array(rng, (8, 8), "float32")
    before = sys.getrefcount(a)
    for _ in range(10_000):
        t = import_array(a, "a")
        np.from_dlpack(t)  # consumed export
        t.__dlpack__(max_version=(1, 1))  # unconsumed export: its capsule frees it
        del t
    assert sys.getrefcount(a) == before


def test_exported_arrays_outlive_the_ferrum_tensor(rng):
    a = numpy_array(rng, (6,), "float32")
    expected = a.copy()
    t = import_array(a, "a")
    view = np.from_dlpack(t)
    del t, a
    np.testing.assert_array_equal(view, expected)


def test_objects_without_dlpack_are_refused_by_name():
    with pytest.raises(TypeError, match=r"x: expected an array with __dlpack__ .*; got list"):
        import_array([[1.0]], "x")


@pytest.mark.parametrize("metadata, message", [
    (dict(shape=(-1, 4)), r"shape \[-1, 4\] of float32 has a negative dimension"),
    (dict(shape=(2**40, 2**40)), r"shape \[1099511627776, 1099511627776\] of float32 exceeds 2\^48 bytes"),
    (dict(shape=(2**62, 16)), r"exceeds 2\^48 bytes"),
    (dict(shape=(3, 4), ndim=-1), r"ndim -1 is not in \[0, 32\]"),
    (dict(shape=(3, 4), ndim=100), r"ndim 100 is not in \[0, 32\]"),
    (dict(shape=(3, 4), null_shape=True), "shape is NULL for ndim 2"),
    (dict(shape=(3, 4), strides=(2**62, 1)), r"strides \[4611686018427387904, 1\] for shape \[3, 4\] reach past 2\^48"),
    (dict(shape=(3, 4), strides=(-2**63, 1)), "reach past 2\\^48"),
    (dict(shape=(3, 4), dtype=(2, 0, 1)), r"dtype dtype\(code=2, bits=0, lanes=1\) has no size"),
    (dict(shape=(3, 4), dtype=(2, 32, 0)), "has no size"),
])
def test_hostile_dlpack_metadata_is_refused_and_released(metadata, message):
    """Metadata no real array has: a ValueError naming the argument, and the
    producer's deleter still runs exactly once (the capsule was consumed)."""
    from handmade_dlpack import Producer

    producer = Producer(np.arange(12, dtype=np.float32), **metadata)
    with pytest.raises(ValueError, match="x: DLPack tensor: .*" + message):
        import_array(producer, "x")
    assert producer.deleted == 1


def test_a_null_data_pointer_is_refused_unless_the_array_is_empty():
    from handmade_dlpack import Producer

    with pytest.raises(ValueError, match=r"x: DLPack tensor: data is NULL for shape \[3, 4\]"):
        import_array(Producer(None, (3, 4)), "x")
    empty = import_array(Producer(None, (0, 4), strides=(0, 0)), "x")
    assert empty.shape == (0, 4) and empty.is_compact


def test_hand_built_views_read_the_right_elements(rng):
    """Strides and a byte offset exactly as a producer states them."""
    from handmade_dlpack import Producer

    base = rng.standard_normal(40).astype(np.float32)
    producer = Producer(base, (3, 2), strides=(10, 3), byte_offset=4 * 5)
    got = np.from_dlpack(import_array(producer, "x"))
    np.testing.assert_array_equal(got, base[5:].reshape(-1)[:30].reshape(3, 10)[:, 0:6:3])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stream=2**70), ValueError, r"__dlpack__: stream 1180591620717411303424 does not fit in 64 bits"),
    (dict(stream=-5), ValueError, r"__dlpack__: stream must be -1, None or a stream handle >= 0; got -5"),
    (dict(stream="s"), TypeError, r"__dlpack__: stream must be an int; got 's'"),
    (dict(max_version="x"), TypeError, r"__dlpack__: max_version must be a tuple of two ints; got 'x'"),
    (dict(max_version=(1, 2**65)), ValueError, "max_version 36893488147419103232 does not fit in 64 bits"),
    (dict(dl_device=[1, 0]), TypeError, r"__dlpack__: dl_device must be a tuple of two ints; got \[1, 0\]"),
    (dict(copy="yes"), TypeError, r"__dlpack__: copy must be a bool or None; got 'yes'"),
    (dict(copy=True), NotImplementedError, "copy=True is not supported"),
    (dict(dl_device=(2, 0)), NotImplementedError, "cannot export to another device"),
])
def test_export_arguments_are_named(rng, kwargs, error, message):
    t = import_array(numpy_array(rng, (2, 2), "float32"), "a")
    with pytest.raises(error, match=message):
        t.__dlpack__(**kwargs)


def _old_refusing_export(self, stream=None):
    raise BufferError("read-only")


@pytest.mark.parametrize("producer, error, message", [
    (type("NoDevice", (), {"__dlpack__": lambda self, **k: None})(), TypeError,
     r"x: expected an array with __dlpack__ and __dlpack_device__ .*; got NoDevice"),
    (type("BadDevice", (), {"__dlpack__": lambda self, **k: None, "__dlpack_device__": lambda self: "cpu"})(),
     TypeError, r"x: __dlpack_device__\(\) must return \(device_type, device_id\) ints; got 'cpu'"),
    (type("NotACapsule", (), {"__dlpack__": lambda self, **k: 42, "__dlpack_device__": lambda self: (1, 0)})(),
     TypeError, r"x: __dlpack__\(\) returned int, not a DLPack capsule"),
    # A producer of DLPack 0.x (no max_version) that refuses the export, as numpy
    # before 2.1 refused a read-only array.
    (type("OldRefusing", (), {"__dlpack__": _old_refusing_export, "__dlpack_device__": lambda self: (1, 0)})(),
     ValueError, r"x: the array cannot be exported through DLPack: read-only"),
])
def test_broken_producers_are_named(producer, error, message):
    with pytest.raises(error, match=message):
        import_array(producer, "x")


def test_a_view_larger_than_its_tensor_is_refused_without_overflow():
    t = fm.Tensor.from_capsule(np.zeros(64, np.float32).__dlpack__())
    with pytest.raises(ValueError, match=r"view: shape \[4611686018427387904, 16\] needs more elements than the tensor's 64"):
        t.view([2**62, 16])
    with pytest.raises(ValueError, match=r"view: negative dimension in \[-1, 64\]"):
        t.view([-1, 64])
    assert t.view([0, 2**40]).shape == (0, 2**40)
    with pytest.raises(ValueError, match=r"view: shape \[0, 4611686018427387904\] needs more elements"):
        t.view([0, 2**62])  # empty, but its other dimensions would not multiply within int64 bounds
