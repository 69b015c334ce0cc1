"""The process-wide settings: :func:`configure` sets them in code (or from a parsed command line),
:func:`get_settings` gives the effective settings now (environment read live), :func:`reset_settings`
forgets what code set."""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from .. import caches
from ..errors import ConfigError
from .flags import ENV_PREFIX
from .layers import configured
from .schema import LVSASettings

_cache: dict[tuple[int, tuple[tuple[str, str], ...]], LVSASettings] = {}
_cache_lock = threading.Lock()


def _forget_effective() -> None:
    with _cache_lock:
        _cache.clear()


caches.register("settings", _forget_effective)


def configure(settings: LVSASettings | None = None, **overrides: Any) -> LVSASettings:
    """Set the process-wide settings in code and return the effective settings.

    A settings object replaces the current configuration with the values it got from code or the command
    line (values it read from the environment are not frozen: the environment is read live). Keyword
    overrides apply on top, as code. Environment variables and command-line flags still beat code."""
    code = dict(configured.code) if settings is None else {}
    cli = dict(configured.cli) if settings is None else {}
    if settings is not None:
        # an application's subclass: only the library's fields are the library's configuration
        for name in settings.model_fields_set & set(LVSASettings.model_fields):
            source = settings.source_of(name)
            if source == "cli":
                cli[name] = getattr(settings, name)
            elif source in ("code", "model"):
                code[name] = getattr(settings, name)
    unknown = sorted(set(overrides) - set(LVSASettings.model_fields))
    if unknown:
        close = {u: difflib.get_close_matches(u, list(LVSASettings.model_fields), n=1) for u in unknown}
        hints = ", ".join(f"{u}" + (f" (did you mean {c[0]}?)" if c else "") for u, c in close.items())
        raise ConfigError(f"unknown setting(s): {hints}")
    code.update(overrides)
    effective = _build(code, cli)  # validate before anything is stored
    configured.set(code, cli)
    _forget_effective()
    return effective


def reset_settings() -> None:
    """Forget everything :func:`configure` set (tests, notebooks)."""
    configured.set({}, {})
    _forget_effective()


def get_settings() -> LVSASettings:
    """The effective settings now: flags given to :func:`configure` > environment > code > defaults.
    Cheap to call repeatedly: the result is cached until the configuration or an LVSA_* variable changes."""
    key = (configured.version, tuple(sorted(_lvsa_environment())))
    cached = _cache.get(key)
    if cached is not None:
        return cached
    effective = _build(configured.code, configured.cli)
    with _cache_lock:
        if len(_cache) > 32:
            _cache.clear()
        _cache[key] = effective
    return effective


def _lvsa_environment() -> Iterator[tuple[str, str]]:
    return ((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX))


def _build(code: Mapping[str, Any], cli: Mapping[str, Any]) -> LVSASettings:
    return LVSASettings(_cli=cli, **code)
