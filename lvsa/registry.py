"""Entry-point discovery of drivers (``lvsa.backends``), devices (``lvsa.devices``) and model adapters
(``lvsa.adapters``) through stevedore.

Every plugin of a namespace is loaded once per process. A plugin that fails to import or to construct is
kept with its error, so ``lvsa drivers`` and error messages can say why it is missing instead of the
plugin silently disappearing (stevedore's default)."""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from stevedore import ExtensionManager

from . import caches, log, plugin_names
from .device import Device
from .driver import Availability, Driver
from .plugin_names import ADAPTERS_NAMESPACE as ADAPTERS_NAMESPACE
from .plugin_names import DEVICES_NAMESPACE, DRIVERS_NAMESPACE

T = TypeVar("T")


@dataclass(frozen=True)
class Plugin(Generic[T]):
    """One entry point: the loaded object, or why it could not be loaded."""

    name: str
    target: str  # "module:attr"
    distribution: str | None
    obj: T | None
    error: str | None


_lock = threading.Lock()
_loaded: dict[str, dict[str, Plugin]] = {}


def plugins(namespace: str, base: type[T]) -> dict[str, Plugin[T]]:
    """Every entry point of ``namespace``, loaded once per process; an object that is not a ``base`` is
    reported as a failure (for namespaces whose contract lives outside the core, such as model adapters)."""
    return _load(namespace, base)


def _load(namespace: str, base: type) -> dict[str, Plugin]:
    with _lock:
        if namespace in _loaded:
            return _loaded[namespace]
        failures: dict[str, tuple[object, BaseException]] = {}

        def on_failure(_manager: object, entry_point: object, error: BaseException) -> None:
            failures[getattr(entry_point, "name", str(entry_point))] = (entry_point, error)

        manager = ExtensionManager(namespace, invoke_on_load=True, on_load_failure_callback=on_failure)
        plugins: dict[str, Plugin] = {}
        for ext in manager.extensions:
            ep = ext.entry_point
            error = None
            if not isinstance(ext.obj, base):
                error = f"{ep.value} is not a {base.__module__}.{base.__name__}"
            if ext.name in plugins:
                log.logger.warning(
                    "[LVSA] two plugins named %r in %s: keeping %s, ignoring %s",
                    ext.name, namespace, plugins[ext.name].target, ep.value,
                )
                continue
            plugins[ext.name] = Plugin(
                ext.name, ep.value, _distribution(ep), None if error else ext.obj, error
            )
        for name, (ep, exc) in failures.items():
            message = f"failed to load {getattr(ep, 'value', ep)}: {type(exc).__name__}: {exc}"
            log.logger.warning("[LVSA] plugin %r of %s: %s", name, namespace, message)
            plugins.setdefault(name, Plugin(name, getattr(ep, "value", "?"), _distribution(ep), None, message))
        _loaded[namespace] = dict(sorted(plugins.items()))
        return _loaded[namespace]


def _distribution(entry_point: object) -> str | None:
    dist = getattr(entry_point, "dist", None)
    if dist is not None:
        return getattr(dist, "name", None)
    # stevedore's on-disk cache rebuilds entry points without their distribution: ask importlib.metadata
    group, name, value = (getattr(entry_point, a, None) for a in ("group", "name", "value"))
    for candidate in importlib.metadata.entry_points(group=group or ""):
        if candidate.name == name and candidate.value == value and candidate.dist is not None:
            return candidate.dist.name
    return None


def driver_plugins() -> dict[str, Plugin[Driver]]:
    """Every registered driver, loaded or not, by name."""
    return _load(DRIVERS_NAMESPACE, Driver)


def device_plugins() -> dict[str, Plugin[Device]]:
    """Every registered device module, loaded or not, by torch device type."""
    return _load(DEVICES_NAMESPACE, Device)


def drivers() -> dict[str, Driver]:
    return {name: p.obj for name, p in driver_plugins().items() if p.obj is not None}


def devices() -> dict[str, Device]:
    return {name: p.obj for name, p in device_plugins().items() if p.obj is not None}


def get_device(name: str) -> Device | None:
    """The device module for a torch device type, or ``None`` when none is registered."""
    return devices().get(name)


def device_capability(name: str) -> tuple[Availability, tuple[int, int]]:
    """Whether device ``name`` is present here, and its generation (``(0, 0)`` when absent or not
    applicable): what drivers whose kernels exist for some chip generations ask before anything else."""
    device = get_device(name)
    if device is None:
        return Availability.no(f"no {name} device module is installed"), (0, 0)
    present = device.is_available()
    return present, ((device.capability() or (0, 0)) if present else (0, 0))


def _forget_plugins() -> None:
    """Forget loaded plugins (stevedore keeps its own per-process entry-point cache: use a subprocess to
    see a distribution installed after start-up)."""
    with _lock:
        _loaded.clear()
    plugin_names.forget_entry_points()


caches.register("plugins", _forget_plugins)


@contextmanager
def use_plugins(namespace: str, found: Mapping[str, Plugin]) -> Iterator[None]:
    """Within the block, ``namespace`` holds exactly ``found`` (objects made in-process: tests, notebooks,
    applications embedding a driver), then what it held before. The other process-wide caches are cleared on
    the way in and out, so no driver choice or prepared state made with one set of plugins outlives it."""
    others = [name for name in caches.registered() if name != "plugins"]
    with _lock:
        before = _loaded.get(namespace)
        _loaded[namespace] = dict(sorted(found.items()))
    given_before = plugin_names.give(namespace, frozenset(found))
    caches.clear(*others)
    try:
        yield
    finally:
        with _lock:
            if before is None:
                _loaded.pop(namespace, None)
            else:
                _loaded[namespace] = before
        plugin_names.give(namespace, given_before)
        caches.clear(*others)
