"""One settings object for every knob: ``LVSA_*`` environment variables, command-line flags, and code.

Three modules, one job each: :mod:`.schema` (the fields, validation, where each value came from),
:mod:`.flags` (each field's variable and flag, and the argparse bridge), :mod:`.store` (the process-wide
:func:`configure` / :func:`get_settings`)."""

from __future__ import annotations

import argparse

from .flags import ENV_PREFIX, env_var, flag
from .flags import add_cli_arguments as _add_cli_arguments
from .schema import LVSASettings, Source, declare_variables
from .store import configure, get_settings, reset_settings

__all__ = ["ENV_PREFIX", "LVSASettings", "Source", "add_cli_arguments", "configure", "declare_variables",
           "env_var", "flag", "get_settings", "reset_settings"]


def add_cli_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, exclude: tuple[str, ...] = (),
                      settings_class: type[LVSASettings] | None = None) -> None:
    """Add one flag per setting of ``settings_class`` (by default the library's :class:`LVSASettings`; an
    application's subclass gets flags for its own fields too): ``--sparsity-scale 0.5``,
    ``--rotate-keyframes/--no-rotate-keyframes``. Flags not given stay absent from the namespace, so the
    environment and code still apply. ``exclude``: settings the application sets from flags of its own."""
    _add_cli_arguments(parser, exclude, settings_class or LVSASettings)
