"""The names a plug-in namespace answers to, known without loading a plug-in: its entry points (package metadata)
and the plug-ins a program gives in-process (:func:`lvsa.registry.use_plugins` records them here). The settings
check a driver name against them; nothing here imports a plug-in or torch."""

from __future__ import annotations

import functools
import importlib.metadata
import threading

#: the entry-point groups of drivers, devices and model adapters
DRIVERS_NAMESPACE = "lvsa.backends"
DEVICES_NAMESPACE = "lvsa.devices"
ADAPTERS_NAMESPACE = "lvsa.adapters"

_lock = threading.Lock()
_given: dict[str, frozenset[str]] = {}


def names(namespace: str) -> frozenset[str]:
    """Entry-point names of ``namespace`` and those given in-process. Empty when lvsa runs from a source tree
    without being installed (no entry point exists then)."""
    with _lock:
        given = _given.get(namespace, frozenset())
    return _entry_point_names(namespace) | given


def give(namespace: str, given: frozenset[str] | None) -> frozenset[str] | None:
    """Record the in-process names of ``namespace`` (None: none); returns what was recorded before."""
    with _lock:
        before = _given.pop(namespace, None)
        if given is not None:
            _given[namespace] = given
        return before


@functools.cache
def _entry_point_names(namespace: str) -> frozenset[str]:
    return frozenset(entry.name for entry in importlib.metadata.entry_points(group=namespace))


def forget_entry_points() -> None:
    """Read the entry points again on the next question (a distribution installed while the process runs)."""
    _entry_point_names.cache_clear()
