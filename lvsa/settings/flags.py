"""The settings' names outside Python: each field's ``LVSA_*`` variable and command-line flag, and the
argparse bridge that turns a settings class's fields into flags and parses them. Knows no settings class
of its own: the callers pass the class whose fields they want."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import ConfigError

ENV_PREFIX = "LVSA_"

# What an unset (None) default means, for --help and the README table.
_UNSET_MEANS = {
    "rotate_keyframes": "auto (on when sparse)",
    "riflex_s": "the extension ratio T / reference, at least 1",
    "schedule_start": "unset",
    "schedule_end": "unset",
}


# Metavars that say more than the type's ("NAME" for every string).
_METAVARS = {"dense_layers": "RANGES"}


def env_var(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag(field: str, settings_class: type | None = None) -> str:
    """The command-line flag of ``field`` (``settings_class.flag_names`` renames some)."""
    names: dict[str, str] = getattr(settings_class, "flag_names", {})
    return names.get(field, "--" + field.replace("_", "-"))


def add_cli_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, exclude: tuple[str, ...],
                      settings_class: Any) -> None:
    """Add one flag per field of ``settings_class``: ``--sparsity-scale 0.5``,
    ``--rotate-keyframes/--no-rotate-keyframes``. Flags not given stay absent from the namespace, so the
    environment and code still apply. ``exclude``: fields the application sets from flags of its own."""
    for name, info in settings_class.model_fields.items():
        if name in exclude:
            continue
        annotation = _strip_optional(info.annotation)
        default = info.default
        shown = _UNSET_MEANS.get(name, "model's") if default is None else default
        help_text = f"{info.description} [env: {env_var(name)}] (default: {shown})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        option = flag(name, settings_class)
        if annotation is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is Literal:
            parser.add_argument(option, choices=list(typing.get_args(annotation)), **kwargs)
        else:
            metavar = _METAVARS.get(name) or {int: "N", float: "X", str: "NAME"}.get(annotation, "VALUE")
            # strings: pydantic converts, so a bad value reads the same from a flag as from the env
            parser.add_argument(option, type=str, metavar=metavar, **kwargs)


def parse_flags(args: Sequence[str], settings_class: Any) -> dict[str, Any]:
    """The fields of ``settings_class`` given in ``args`` (flags only; an unknown flag is an error)."""
    parser = argparse.ArgumentParser(prog="lvsa", add_help=False, exit_on_error=False, allow_abbrev=False)
    add_cli_arguments(parser, (), settings_class)
    try:
        namespace, rest = parser.parse_known_args(list(args))
    except argparse.ArgumentError as error:
        raise ConfigError(f"invalid flag: {error}") from None
    if rest:
        raise ConfigError(f"unknown flag(s): {' '.join(rest)} (see `lvsa plan --help`)")
    return {k: v for k, v in vars(namespace).items() if k in settings_class.model_fields}


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
