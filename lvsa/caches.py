"""The process-wide caches, each registered here under a name, with one :func:`clear` for all of them.

A cache is anything kept for the life of the process that a later answer depends on: the loaded plugins,
the driver choices and prepared states, the ring's skipped shards, the settings. Tests, notebooks and
programs that install a plugin or change the environment mid-run call :func:`clear` rather than reaching
into a module's private dictionaries."""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_clears: dict[str, Callable[[], None]] = {}


def register(name: str, clear_function: Callable[[], None]) -> None:
    """Register ``clear_function`` as the way to empty the cache called ``name`` (registering again replaces it)."""
    with _lock:
        _clears[name] = clear_function


def registered() -> list[str]:
    """The names of the registered caches."""
    with _lock:
        return sorted(_clears)


def clear(*names: str) -> None:
    """Empty the caches called ``names``, or every registered cache when none is named."""
    with _lock:
        unknown = sorted(set(names) - set(_clears))
        if unknown:
            raise KeyError(f"no cache named {', '.join(unknown)}; registered: {', '.join(sorted(_clears))}")
        chosen = [_clears[name] for name in (names or sorted(_clears))]
    for clear_function in chosen:
        clear_function()
