"""lvsa: training-free frame-level block-sparse attention for long-video diffusion transformers.

``make_plan`` turns geometry and knobs into a :class:`SparsePlan` (pure Python); ``sparse_attention`` runs a
plan through a driver found by entry point (``lvsa.backends``); ``LVSASettings`` / ``configure`` hold the
knobs; ``apply`` installs lvsa on a diffusers pipeline (``remove`` undoes it); :mod:`lvsa.attention` is
where every layer call is executed. Parts that need torch are imported on first use, so ``import lvsa``
stays light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import log
from .errors import (
    ConfigError,
    DriverUnavailable,
    GeometryError,
    LVSAError,
)
from .log import setup_logging
from .plan import SparsePlan
from .planning import make_plan
from .settings import LVSASettings, configure, get_settings, reset_settings

__version__ = "0.1.0"

_LAZY = {
    "apply": "lvsa.adapters",
    "remove": "lvsa.adapters",
    "handle_of": "lvsa.adapters",
    "LVSAHandle": "lvsa.adapters",
    "sparse_attention": "lvsa.attention",
    "available_drivers": "lvsa.driver_status",
    "DriverStatus": "lvsa.driver_status",
    "Driver": "lvsa.driver",
    "Availability": "lvsa.driver",
    "AttentionProblem": "lvsa.driver",
    "Prepared": "lvsa.driver",
    "Device": "lvsa.device",
    "MemoryStats": "lvsa.device",
}

if TYPE_CHECKING:
    from .adapters import LVSAHandle, apply, handle_of, remove
    from .attention import sparse_attention
    from .device import Device, MemoryStats
    from .driver import AttentionProblem, Availability, Driver, Prepared
    from .driver_status import DriverStatus, available_drivers


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lvsa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AttentionProblem",
    "Availability",
    "ConfigError",
    "Device",
    "Driver",
    "DriverStatus",
    "DriverUnavailable",
    "GeometryError",
    "LVSAError",
    "LVSAHandle",
    "LVSASettings",
    "MemoryStats",
    "Prepared",
    "SparsePlan",
    "__version__",
    "apply",
    "available_drivers",
    "configure",
    "get_settings",
    "handle_of",
    "log",
    "make_plan",
    "remove",
    "reset_settings",
    "setup_logging",
    "sparse_attention",
]
