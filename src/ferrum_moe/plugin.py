"""Helpers for backend plugin authors.

A backend is a C function table (``ferrum_moe/plugin.h``). Its entry point in the
``ferrum_moe.backends`` group returns a PyCapsule named ``"ferrum_moe.backend_api"``
holding a ``const FmBackendApi*``. A plugin built as a plain shared library (no
Python headers, no pybind11) exports ``fm_backend_get_api`` and writes its entry
point as::

    def backend_api():
        return ferrum_moe.plugin.capsule_from_library(Path(__file__).with_name("libmine.so"))
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

CAPSULE_NAME = b"ferrum_moe.backend_api"
ENTRY_SYMBOL = "fm_backend_get_api"

# Loaded libraries stay referenced for the life of the process: the function
# table they return lives in them.
_libraries: dict[str, ctypes.CDLL] = {}

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def capsule_from_library(path: str | os.PathLike) -> object:
    """Loads the shared library at ``path`` and wraps its ``fm_backend_get_api()``
    table in the capsule an entry point returns."""
    path = str(Path(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"backend library {path} does not exist (is the plugin installed completely?)")
    lib = _libraries.get(path)
    if lib is None:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        _libraries[path] = lib
    try:
        get_api = getattr(lib, ENTRY_SYMBOL)
    except AttributeError:
        raise RuntimeError(f"backend library {path} does not export {ENTRY_SYMBOL}") from None
    get_api.restype = ctypes.c_void_p
    get_api.argtypes = []
    table = get_api()
    if not table:
        raise RuntimeError(f"{ENTRY_SYMBOL} in {path} returned NULL")
    return _capsule_new(table, CAPSULE_NAME, None)
