"""DLPack producers built by hand with ctypes: any shape, strides, byte offset,
dtype or data pointer, as a buggy or hostile library could export them. The
memory behind them is a real numpy buffer; only the metadata lies. Each
producer counts how often its deleter ran, so tests can check ownership."""

from __future__ import annotations

import ctypes

import numpy as np


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

DTYPE_CODES = {"int": 0, "uint": 1, "float": 2, "bfloat": 4}
# Producers whose deleter has not run yet: ctypes memory must outlive every capsule.
_alive: set[Producer] = set()


class Producer:
    """An object with __dlpack__/__dlpack_device__ exporting ``buffer`` (a numpy
    array, or None for a NULL data pointer) under the given metadata. Shape,
    strides and byte_offset are taken as given; strides None means NULL."""

    def __init__(self, buffer: np.ndarray | None, shape, *, strides=None, byte_offset=0, dtype=None,
                 device=(1, 0), ndim=None, null_shape=False, read_only=False, version=(1, 1)):
        self.buffer = buffer
        self.deleted = 0
        self.device = device
        ndim = len(shape) if ndim is None else ndim
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * max(len(strides), 1))(*strides)
        if dtype is None and buffer is None:
            dtype = (DTYPE_CODES["float"], 32, 1)
        elif dtype is None:
            kind = {"i": "int", "u": "uint", "f": "float"}[buffer.dtype.kind]
            dtype = (DTYPE_CODES[kind], buffer.dtype.itemsize * 8, 1)
        m = DLManagedTensorVersioned()
        m.version = DLPackVersion(*version)
        m.flags = 1 if read_only else 0
        t = m.dl_tensor
        t.data = None if buffer is None else buffer.ctypes.data
        t.device = DLDevice(*device)
        t.ndim = ndim
        t.dtype = DLDataType(*dtype)
        t.shape = None if null_shape else ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = None if self._strides is None else ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64))
        t.byte_offset = byte_offset
        self._deleter = DELETER(self._delete)
        m.deleter = self._deleter
        self._managed = m

    def _delete(self, _ptr):
        self.deleted += 1
        _alive.discard(self)

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        _alive.add(self)
        return _capsule_new(ctypes.addressof(self._managed), b"dltensor_versioned", None)
