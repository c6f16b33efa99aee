"""Entry point of the built-in CPU backend: registered in pyproject.toml exactly as
a third-party plugin registers, loaded through the same C ABI."""

from pathlib import Path

from . import _core
from .plugin import capsule_from_library


def backend_api():
    # Compiled parts install beside _core (also in editable installs, where the
    # Python sources stay in the source tree).
    return capsule_from_library(Path(_core.__file__).parent / "lib" / "libferrum_moe_cpu.so")
