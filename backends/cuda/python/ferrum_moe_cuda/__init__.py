"""ferrum-moe's CUDA backend.

The kernels live in ``libferrum_moe_cuda.so`` next to this file, a plain
shared library that does not link Python. ferrum-moe finds this package
through the ``ferrum_moe.backends`` entry point and calls :func:`backend_api`.
"""

from __future__ import annotations

import os

__all__ = ["backend_api", "library_path"]

_LIBRARY_NAME = "libferrum_moe_cuda.so"


def library_path() -> str:
    """Absolute path of the installed ``libferrum_moe_cuda.so``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY_NAME)


def backend_api():
    """PyCapsule ``"ferrum_moe.backend_api"`` holding this backend's ``FmBackendApi*``.

    Loading the library does not touch the GPU; the backend reports "no CUDA
    device" through ferrum-moe when it is initialised on a machine without one.
    """
    from ferrum_moe.plugin import capsule_from_library

    return capsule_from_library(library_path())
