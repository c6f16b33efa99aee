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
