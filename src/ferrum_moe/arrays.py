"""Arrays across the boundary: DLPack import (zero-copy) of anything with
``__dlpack__``, streams, and results handed back as the caller's array type."""

from __future__ import annotations

import numpy as np

from . import _core

Tensor = _core.Tensor

_CPU = 1
_CUDA_LIKE = {2, 10, 13}  # CUDA, ROCm, CUDA managed: these producers take a stream


def stream_handle(stream) -> int:
    """The raw stream handle (cudaStream_t as int) of ``stream``: None (the legacy
    default stream, 0), an int, or an object with ``__cuda_stream__`` or
    ``.cuda_stream`` (PyTorch) or ``.ptr`` (CuPy)."""
    if stream is None:
        return 0
    handle = None
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        handle = stream
    elif hasattr(stream, "__cuda_stream__"):
        value = stream.__cuda_stream__()
        handle = value[1] if isinstance(value, tuple) else value
    else:
        for attr in ("cuda_stream", "ptr"):
            if hasattr(stream, attr):
                handle = getattr(stream, attr)
                break
    if handle is None:
        raise TypeError(
            f"stream: expected None, an int handle or an object with __cuda_stream__; got {type(stream).__name__}"
        )
    if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
        raise TypeError(f"stream: the handle of {type(stream).__name__} must be an int; got {handle!r}")
    if not 0 <= handle < 2**63:  # a pointer, and DLPack passes it on as int64
        raise ValueError(f"stream: a stream handle is in [0, 2**63); got {handle}")
    return int(handle)


def _producer_stream(device_type: int, handle: int):
    """The ``stream`` argument for a producer's __dlpack__: None on the CPU; for
    CUDA-like devices our stream, with the legacy default stream spelled 1
    (DLPack reserves 0)."""
    if device_type not in _CUDA_LIKE:
        return None
    return handle if handle != 0 else 1


def import_array(obj, name: str, stream: int = 0) -> Tensor:
    """Imports ``obj`` zero-copy as a ferrum Tensor; ``name`` is the argument's
    name for error messages. The producer orders its pending work before
    ``stream``."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, np.ndarray):  # host memory: nothing to order, no device to enter
        # ml_dtypes' bfloat16 (kind "V"; numpy's dtype.name is a slow Python
        # property, the scalar type's name is not): numpy cannot export it, its bits can
        if obj.dtype.kind == "V" and obj.dtype.type.__name__ == "bfloat16":
            return import_array(obj.view(np.uint16), name).retyped("bfloat16")
        return _from_capsule(_export(obj, None, name), name)
    capsule = _plain_torch_capsule(obj, stream)
    if capsule is not None:
        return _from_capsule(capsule, name)
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(
            f"{name}: expected an array with __dlpack__ and __dlpack_device__ (numpy, CuPy, PyTorch, JAX, ...); "
            f"got {type(obj).__name__}"
        )
    device = obj.__dlpack_device__()
    if not (isinstance(device, tuple) and len(device) == 2 and
            all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in device)):
        raise TypeError(f"{name}: __dlpack_device__() must return (device_type, device_id) ints; got {device!r}")
    producer_stream = _producer_stream(int(device[0]), stream)
    with _device_context(obj):
        capsule = _export(obj, producer_stream, name)
    if type(capsule).__name__ != "PyCapsule":
        raise TypeError(f"{name}: __dlpack__() returned {type(capsule).__name__}, not a DLPack capsule")
    return _from_capsule(capsule, name)


def _export(obj, producer_stream, name: str):
    """``obj.__dlpack__`` for ``producer_stream``, asking for DLPack 1.x."""
    try:
        try:
            return obj.__dlpack__(max_version=(1, 1), stream=producer_stream)
        except TypeError:  # producers older than DLPack 1.0 take no max_version
            return obj.__dlpack__(stream=producer_stream)
    except BufferError as e:
        raise ValueError(f"{name}: the array cannot be exported through DLPack: {e}") from None


def _from_capsule(capsule, name: str) -> Tensor:
    try:
        return Tensor.from_capsule(capsule)
    except (TypeError, ValueError) as e:  # a producer's bad metadata, named by the argument it came as
        raise type(e)(f"{name}: {e}") from None


def _plain_torch_capsule(obj, stream: int):
    """A DLPack capsule of a plain PyTorch tensor through PyTorch's C export
    (``torch.utils.dlpack.to_dlpack``), skipping the Python of its ``__dlpack__``
    and ``__dlpack_device__`` (about 4 of a CPU tensor's 6.6 us import on the
    development VM; more on CUDA, where they look the current device and two
    streams up), where
    that protocol would do nothing more: a CPU tensor, or a CUDA tensor whose
    device's current PyTorch stream is ``stream`` (nothing to order). None
    otherwise (a subclass, a tensor the protocol refuses, another stream): the
    protocol runs."""
    if type(obj).__name__ != "Tensor" or type(obj).__module__ != "torch":
        return None
    import torch

    if type(obj) is not torch.Tensor or obj.requires_grad or obj.is_conj() or obj.layout is not torch.strided:
        return None
    if obj.is_cuda:
        if torch.version.hip is not None or _current_torch_stream(torch, obj.get_device()) != stream:
            return None
    elif not obj.is_cpu:
        return None
    return torch.utils.dlpack.to_dlpack(obj)


def _current_torch_stream(torch, device_index: int) -> int:
    """The raw handle of PyTorch's current stream on CUDA device
    ``device_index``: through the C function behind
    ``torch.cuda.current_stream(i).cuda_stream`` where this PyTorch has it (the
    public call builds a Stream object in Python first), else the public call."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        try:
            return raw(device_index)
        except (TypeError, RuntimeError):  # a PyTorch whose private function changed
            pass
    return torch.cuda.current_stream(device_index).cuda_stream


def import_output(obj, name: str, stream: int = 0) -> Tensor:
    """Imports an ``out=`` array: it must be writable. JAX arrays are immutable
    but JAX does not mark its DLPack exports read-only, so they are refused by
    type; other producers' READ_ONLY flag is checked by the core."""
    if type(obj).__module__.split(".")[0] in ("jax", "jaxlib"):
        raise ValueError(f"{name} is read-only (a JAX array; JAX arrays are immutable): pass a writable array, "
                         "or leave it out to get a new JAX array back")
    return import_array(obj, name, stream)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _device_context(obj):
    """PyTorch exports CUDA tensors relative to the current device: switch to the
    tensor's device first."""
    if type(obj).__module__.startswith("torch") and getattr(obj, "is_cuda", False):
        import torch

        return torch.cuda.device(obj.device)
    return _NullContext()


def host_array(obj, name: str, dtype) -> np.ndarray:
    """A numpy array of index data that the host must read (dispatch rows):
    lists, numpy, or a CPU array of any library. Device arrays are refused."""
    if hasattr(obj, "__dlpack_device__") and not isinstance(obj, np.ndarray):
        device_type, _ = obj.__dlpack_device__()
        if int(device_type) != _CPU:
            raise ValueError(f"{name}: must be a host array (it is read on the host); got an array on a device")
        obj = np.from_dlpack(obj)
    try:
        a = np.asarray(obj)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name}: {e}") from None
    if a.dtype == object and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in a.flat):
        raise ValueError(f"{name}: values must fit in {np.dtype(dtype)}; got ints beyond 64 bits")
    if a.dtype.kind not in "iu" and a.size:
        raise TypeError(f"{name}: must hold integers; got dtype {a.dtype}")
    if a.size and a.dtype.kind in "iu" and (a.max() > np.iinfo(dtype).max or a.min() < np.iinfo(dtype).min):
        raise ValueError(f"{name}: values must fit in {np.dtype(dtype)}; got [{a.min()}, {a.max()}]")
    return np.ascontiguousarray(a, dtype=dtype)


def host_copy(obj, name: str) -> np.ndarray:
    """A numpy copy of a (small) device array, for the few host reads the API
    makes (the height of a result sized by a device dispatch table). Asks the
    producer through DLPack first (``dl_device``/``copy``, DLPack 1.0), then
    through the libraries' own host transfers. Synchronises."""
    try:
        return np.from_dlpack(obj, device="cpu", copy=True)
    except (TypeError, ValueError, BufferError, NotImplementedError, RuntimeError):
        pass
    for getter in ("get", "cpu"):  # CuPy's .get(), PyTorch's .cpu()
        if hasattr(obj, getter):
            return np.asarray(getattr(obj, getter)())
    try:
        return np.asarray(obj)  # JAX and others implementing __array__
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: cannot copy this {type(obj).__name__} to the host ({e}); pass out= so it "
                        "need not be read") from None


def to_caller(t: Tensor, like):
    """``t`` as the array type of ``like`` (numpy in, numpy out; torch in, torch
    out; ...). Zero-copy through DLPack. Unknown types get the ferrum Tensor,
    which itself speaks DLPack."""
    module = type(like).__module__.split(".")[0]
    if module == "numpy" or isinstance(like, (list, tuple)):
        if t.dtype == "bfloat16":
            import ml_dtypes

            return np.from_dlpack(t.retyped("uint16")).view(ml_dtypes.bfloat16)
        return np.from_dlpack(t)
    if module == "torch":
        import torch

        return torch.from_dlpack(t)
    if module == "cupy":
        import cupy

        return cupy.from_dlpack(t)
    if module in ("jax", "jaxlib"):
        import jax.dlpack

        return jax.dlpack.from_dlpack(t)
    return t
