"""Backend discovery: plugins registered under the ``ferrum_moe.backends``
entry-point group, loaded lazily (on first use, under a lock).

``FERRUM_MOE_BACKENDS=cuda,cpu`` selects and orders the backends; without it
every installed backend is used, in name order. A plugin that fails to import or
initialise is recorded with its reason, raised only when that backend is asked
for.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import threading

import numpy as np

from . import _core

ENTRY_POINT_GROUP = "ferrum_moe.backends"
ENV_VAR = "FERRUM_MOE_BACKENDS"

DEVICE_TYPES = {1: "cpu", 2: "cuda", 3: "cuda_host", 10: "rocm", 13: "cuda_managed"}
DEVICE_CODES = {"cpu": 1, "cuda": 2, "rocm": 10}


class BackendUnavailableError(RuntimeError):
    """The backend asked for is not installed or could not be loaded."""


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    device_types: tuple[str, ...]
    version: str
    error: str | None
    description: str = ""
    device_count: int = 0
    abi: str = ""


class _Slot:
    """One discovered backend: its entry point, then its loaded form or the error."""

    def __init__(self, name: str, entry_point: importlib.metadata.EntryPoint | None):
        self.name = name
        self.entry_point = entry_point
        self.loaded = False
        self.backend: _core.Backend | None = None
        self.error: str | None = None if entry_point else f"no plugin named '{name}' is installed"

    def load(self) -> None:
        if self.loaded or self.entry_point is None:
            return
        self.loaded = True
        try:
            target = self.entry_point.load()
            capsule = target() if callable(target) else target
            backend = _core.Backend.load(capsule)
            if backend.name != self.name:
                raise RuntimeError(f"the plugin registered as '{self.name}' calls itself '{backend.name}'")
            self.backend = backend
        except (Exception, SystemExit) as e:  # recorded, raised when this backend is asked for
            self.error = f"{type(e).__name__}: {e}"


_lock = threading.RLock()
_slots: dict[str, _Slot] | None = None


def _discover() -> dict[str, _Slot]:
    global _slots
    with _lock:
        if _slots is None:
            found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
            wanted = os.environ.get(ENV_VAR, "").strip()
            names = [n.strip() for n in wanted.split(",") if n.strip()] if wanted else sorted(found)
            _slots = {name: _Slot(name, found.get(name)) for name in names}
        return _slots


def _reset_for_tests() -> None:
    """Forgets every discovered backend; the next call discovers again."""
    global _slots
    with _lock:
        _slots = None


def _info(slot: _Slot) -> BackendInfo:
    b = slot.backend
    if b is None:
        version = slot.entry_point.dist.version if slot.entry_point and slot.entry_point.dist else ""
        return BackendInfo(slot.name, False, (), version, slot.error)
    types = tuple(DEVICE_TYPES.get(t, f"type{t}") for t in b.device_types)
    return BackendInfo(b.name, True, types, b.version, None, b.description, b.device_count, b.abi_version)


def backends() -> list[BackendInfo]:
    """Every selected backend, loaded, in selection order."""
    with _lock:
        slots = _discover()
        for slot in slots.values():
            slot.load()
        return [_info(slot) for slot in slots.values()]


def get_backend(name: str) -> _core.Backend:
    """The loaded backend called ``name``; BackendUnavailableError with the reason otherwise."""
    with _lock:
        slots = _discover()
        slot = slots.get(name)
        if slot is None:
            selected = ", ".join(slots) or "none"
            raise BackendUnavailableError(
                f"backend '{name}' is not selected (selected: {selected}; {ENV_VAR}={os.environ.get(ENV_VAR, '')!r})"
            )
        slot.load()
        if slot.backend is None:
            raise BackendUnavailableError(f"backend '{name}' is unavailable: {slot.error}")
        return slot.backend


def parse_device(device) -> tuple[int, int]:
    """'cpu', 'cuda', 'cuda:1', a (type, id) DLPack device tuple, or an object with
    __dlpack_device__ -> (DLPack device type, device id)."""
    pair = device.__dlpack_device__() if hasattr(device, "__dlpack_device__") else device
    if isinstance(pair, tuple) and len(pair) == 2:
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 2**31 for v in pair):
            return int(pair[0]), int(pair[1])
        raise ValueError(f"device: a (device_type, device_id) tuple holds two ints in [0, 2**31); got {pair!r}")
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind in DEVICE_CODES and (index == "" or (index.isdigit() and int(index) < 2**31)):
            return DEVICE_CODES[kind], int(index or 0)
    raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or a (device_type, device_id) tuple; got {device!r}")


def device_name(device: tuple[int, int]) -> str:
    t, i = device
    name = DEVICE_TYPES.get(t, f"type{t}")
    return name if t == 1 else f"{name}:{i}"


def resolve(backend: str, device: tuple[int, int]) -> _core.Backend:
    """The backend to use for arrays on ``device``: ``backend`` itself, or with
    "auto" the first selected backend that computes there."""
    if backend != "auto":
        b = get_backend(backend)
        if device[0] not in b.device_types or (device[0] != 1 and device[1] >= b.device_count):
            raise ValueError(f"backend '{backend}' does not compute on {device_name(device)}")
        return b
    with _lock:
        reasons = []
        for slot in _discover().values():
            slot.load()
            b = slot.backend
            if b is None:
                reasons.append(f"{slot.name}: {slot.error}")
            elif device[0] in b.device_types and (device[0] == 1 or device[1] < b.device_count):
                return b
            else:
                reasons.append(f"{slot.name}: does not compute on {device_name(device)}")
    raise BackendUnavailableError(
        f"no backend computes on {device_name(device)} ({'; '.join(reasons) or 'no backend installed'})"
    )
