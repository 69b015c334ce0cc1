"""One settings object for every knob: ``LVSA_*`` environment variables, command-line flags, and code.

Precedence, highest first: CLI flag > environment variable > code (:func:`configure` or keyword arguments)
> model default (filled in by the model family when a plan is made) > the field's default. Every value
remembers where it came from (:meth:`LVSASettings.source_of`), so an error or a bug report can say
``LVSA_SPARSITY_SCALE=-1 (environment)`` rather than only the field name."""

from __future__ import annotations

import argparse
import difflib
import os
import threading
import types
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .errors import ConfigError

ENV_PREFIX = "LVSA_"
Source = Literal["default", "model", "code", "env", "cli"]

# LVSA_* names that are not settings but are still legitimate: no "unknown variable" warning for them.
# Programs around the library (the test suite, the example application) add theirs: declare_variables().
_NON_SETTING_VARIABLES = {
    "LVSA_WAN_HOOK": "used only by the old vllm-omni integration; it has no effect in lvsa",
}
# What an unset (None) default means, for --help and the README table.
_UNSET_MEANS = {
    "rotate_keyframes": "auto (on when sparse)",
    "riflex_s": "the extension ratio T / reference, at least 1",
    "schedule_start": "unset",
    "schedule_end": "unset",
}
_DEPRECATED = {
    "schedule_start": "LVSA_SCHEDULE_START",
    "schedule_end": "LVSA_SCHEDULE_END",
}

# Values given on the command line for the settings object being built (see _CommandLineLayer).
_cli_values: ContextVar[Mapping[str, Any]] = ContextVar("lvsa_cli_values", default=types.MappingProxyType({}))


class _CommandLineLayer(PydanticBaseSettingsSource):
    """The parsed flags, placed above the environment (pydantic-settings would put init kwargs there)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_cli_values.get())


class LVSASettings(BaseSettings):
    """Every knob of the library. Video-frame counts (window, leading frames, keyframe spacing) are converted
    to latent frames with the VAE's temporal factor when a plan is made.

    An application adds knobs of its own by subclassing (the example scripts' ``lvsa_app.settings``): its
    fields get ``LVSA_*`` variables and flags the same way, and ``flag_names`` renames a flag."""

    #: flags named otherwise than ``--field-name`` (names users know from the original tool)
    flag_names: ClassVar[dict[str, str]] = {}

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # which driver runs the plan
    backend: str = Field("auto", description="attention driver: auto, or a name from `lvsa drivers`")
    fallback: Literal["error", "warn"] = Field(
        "error",
        description="when the requested driver cannot run: error, or warn ([LVSA-FALLBACK] line) and "
        "use the next available driver",
    )
    # the sparse pattern (docs/pattern.md §2)
    reference_latent_frames: int | None = Field(
        None, gt=0, description="training horizon in latent frames (default: the model's: Wan 21, "
        "Wan 2.2 TI2V-5B 31, HunyuanVideo 1.5 33, CogVideoX 13, CogVideoX 1.5 41)"
    )
    sparsity_scale: float = Field(1.0, gt=0, allow_inf_nan=False,
                                  description="multiplier on the per-query budget; lower is sparser")
    window_size: int = Field(12, ge=0, description="half-width of the local window, in video frames")
    n_first_frames: int = Field(4, ge=0, description="leading video frames that are always global")
    key_frame_interval: int = Field(
        16, ge=1, description="spacing of periodic keyframes in video frames (when auto keyframes is off)"
    )
    auto_keyframes: bool = Field(True, description="derive the keyframe interval from the budget")
    rotate_keyframes: bool | None = Field(
        None, description="shift the keyframe grid one frame per denoising step (default: on when sparse)"
    )
    # geometry overrides for non-default resolutions
    patches_per_frame: int | None = Field(None, gt=0, description="tokens per latent frame (overrides all below)")
    video_height: int | None = Field(None, gt=0, description="video height in pixels")
    video_width: int | None = Field(None, gt=0, description="video width in pixels")
    vae_spatial_factor: int | None = Field(None, gt=0, description="VAE spatial downsampling")
    patch_size: int | None = Field(None, gt=0, description="transformer spatial patch size")
    vae_temporal_factor: int | None = Field(None, gt=0, description="VAE temporal downsampling")
    # RIFLEx: rescale one temporal RoPE frequency for lengths beyond the training horizon
    riflex: bool = Field(False, description="apply RIFLEx to the model's temporal RoPE")
    riflex_s: float | None = Field(
        None, gt=0, description="RIFLEx extension factor s (no change at 1.0)"
    )
    # deprecated: accepted, ignored, warned about
    schedule_start: float | None = Field(None, description="deprecated, no effect: use --sparsity-scale")
    schedule_end: float | None = Field(None, description="deprecated, no effect: use --sparsity-scale")

    _sources: dict[str, Source] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI > environment > code. No .env file and no secrets directory: one place less to look.
        return (_CommandLineLayer(settings_cls), env_settings, init_settings)

    def __init__(self, **values: Any) -> None:
        cli = dict(_cli_values.get())
        env = _environment_values(type(self))
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _config_error(type(self), error, cli, env, values) from None
        sources: dict[str, Source] = {}
        for name in self.model_fields_set:
            sources[name] = "cli" if name in cli else "env" if name in env else "code"
        self._sources = sources
        _warn_deprecated(self)

    @field_validator("backend")
    @classmethod
    def _backend_name(cls, value: str) -> str:
        name = value.strip().lower()
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError("must be 'auto' or a driver name such as 'sdpa' (see `lvsa drivers`)")
        return name

    # ----------------------------------------------------------------------------------------------
    def source_of(self, field: str) -> Source:
        """Where the value of ``field`` came from: default, model, code, env or cli."""
        if field not in type(self).model_fields:
            raise KeyError(field)
        return self._sources.get(field, "default")

    def with_model_defaults(self, **defaults: Any) -> LVSASettings:
        """Fill fields still at their default with a model's values (the lowest layer)."""
        update = {k: v for k, v in defaults.items() if v is not None and self.source_of(k) == "default"}
        if not update:
            return self
        copy = self.model_copy(update=update)
        copy._sources = {**self._sources, **dict.fromkeys(update, "model")}
        return copy

    @classmethod
    def from_cli(
        cls, args: Sequence[str] | argparse.Namespace | Mapping[str, Any], **code: Any
    ) -> LVSASettings:
        """Settings from command-line flags (a list to parse, or an already parsed namespace) over the
        environment over ``code`` (by default, what :func:`configure` set)."""
        if isinstance(args, argparse.Namespace):
            given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
        elif isinstance(args, Mapping):
            given = dict(args)
        else:
            parser = argparse.ArgumentParser(prog="lvsa", add_help=False, exit_on_error=False, allow_abbrev=False)
            add_cli_arguments(parser, settings_class=cls)
            try:
                namespace, rest = parser.parse_known_args(list(args))
            except argparse.ArgumentError as error:
                raise ConfigError(f"invalid flag: {error}") from None
            if rest:
                raise ConfigError(f"unknown flag(s): {' '.join(rest)} (see `lvsa plan --help`)")
            given = {k: v for k, v in vars(namespace).items() if k in cls.model_fields}
        token = _cli_values.set({**_layers.cli, **given})
        try:
            return cls(**{**_layers.code, **code})
        finally:
            _cli_values.reset(token)


# --------------------------------------------------------------------------------------------------
# errors and warnings


def env_var(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag(field: str, settings_class: type[LVSASettings] | None = None) -> str:
    """The command-line flag of ``field``."""
    names = (settings_class or LVSASettings).flag_names
    return names.get(field, "--" + field.replace("_", "-"))


def declare_variables(variables: Mapping[str, str]) -> None:
    """Declare ``LVSA_*`` variables that are not settings of the library but are read by the program around it
    (name -> what it does), so that they raise no "unknown environment variable" warning."""
    _NON_SETTING_VARIABLES.update({name.upper(): meaning for name, meaning in variables.items()})


def _environment_values(settings_class: type[LVSASettings]) -> dict[str, Any]:
    return EnvSettingsSource(settings_class)() if _has_lvsa_environment() else {}


def _has_lvsa_environment() -> bool:
    return any(key.upper().startswith(ENV_PREFIX) for key in os.environ)


def _config_error(
    settings_class: type[LVSASettings], error: ValidationError, cli: Mapping[str, Any], env: Mapping[str, Any],
    code: Mapping[str, Any],
) -> ConfigError:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        where = f"flag {flag(field, settings_class)}, env {env_var(field)}" if field else "settings"
        if field in cli:
            origin = f"{flag(field, settings_class)} {cli[field]!r} (command line)"
        elif field in env:
            origin = f"{env_var(field)}={os.environ.get(env_var(field), env[field])} (environment)"
        elif field in code:
            origin = f"{field}={code[field]!r} (code)"
        else:
            origin = field or "settings"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {message} [field {field}; {where}]" if field else f"{origin}: {message}")
    return ConfigError("invalid lvsa settings:\n  " + "\n  ".join(lines))


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, FutureWarning, stacklevel=4)


def _warn_deprecated(settings: LVSASettings) -> None:
    for field, variable in _DEPRECATED.items():
        if field in settings.model_fields_set:
            _warn_once(
                variable,
                f"[LVSA] {variable} / {flag(field)} is deprecated and has no effect in lvsa; "
                f"use LVSA_SPARSITY_SCALE (--sparsity-scale) to trade quality for speed",
            )
    if _has_lvsa_environment():
        known = {env_var(name) for cls in _settings_classes() for name in cls.model_fields}
        for key in os.environ:
            upper = key.upper()
            if upper.startswith(ENV_PREFIX) and upper not in known and upper not in _NON_SETTING_VARIABLES:
                guess = difflib.get_close_matches(upper, sorted(known), n=1)
                hint = f"; did you mean {guess[0]}?" if guess else ""
                _warn_once(upper, f"[LVSA] unknown environment variable {key} is ignored{hint}")


# --------------------------------------------------------------------------------------------------
# command-line flags derived from the fields


def _settings_classes() -> list[type[LVSASettings]]:
    """LVSASettings and the applications' subclasses imported in this process (their variables are known)."""
    found, pending = [], [LVSASettings]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def add_cli_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      exclude: tuple[str, ...] = (), settings_class: type[LVSASettings] | None = None) -> None:
    """Add one flag per setting: ``--sparsity-scale 0.5``, ``--rotate-keyframes/--no-rotate-keyframes``.
    Flags not given stay absent from the namespace, so the environment and code still apply. ``exclude``:
    settings the application sets from flags of its own (one flag per setting); ``settings_class``: an
    application's subclass, whose own fields get flags too."""
    settings_class = settings_class or LVSASettings
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
            metavar = {int: "N", float: "X", str: "NAME"}.get(annotation, "VALUE")
            # strings: pydantic converts, so a bad value reads the same from a flag as from the env
            parser.add_argument(option, type=str, metavar=metavar, **kwargs)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


# --------------------------------------------------------------------------------------------------
# process-wide configuration


class _Layers:
    def __init__(self) -> None:
        self.code: dict[str, Any] = {}
        self.cli: dict[str, Any] = {}
        self.version = 0


_layers = _Layers()
_cache: dict[tuple[int, tuple[tuple[str, str], ...]], LVSASettings] = {}
_cache_lock = threading.Lock()


def configure(settings: LVSASettings | None = None, **overrides: Any) -> LVSASettings:
    """Set the process-wide settings in code and return the effective settings.

    A settings object replaces the current configuration with the values it got from code or the command
    line (values it read from the environment are not frozen: the environment is read live). Keyword
    overrides apply on top, as code. Environment variables and command-line flags still beat code."""
    code = dict(_layers.code) if settings is None else {}
    cli = dict(_layers.cli) if settings is None else {}
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
    with _cache_lock:
        _layers.code, _layers.cli = code, cli
        _layers.version += 1
        _cache.clear()
    return effective


def reset_settings() -> None:
    """Forget everything :func:`configure` set (tests, notebooks)."""
    with _cache_lock:
        _layers.code, _layers.cli = {}, {}
        _layers.version += 1
        _cache.clear()


def get_settings() -> LVSASettings:
    """The effective settings now: flags given to :func:`configure` > environment > code > defaults.
    Cheap to call repeatedly: the result is cached until the configuration or an LVSA_* variable changes."""
    key = (_layers.version, tuple(sorted(_lvsa_environment())))
    cached = _cache.get(key)
    if cached is not None:
        return cached
    effective = _build(_layers.code, _layers.cli)
    with _cache_lock:
        if len(_cache) > 32:
            _cache.clear()
        _cache[key] = effective
    return effective


def _lvsa_environment() -> Iterator[tuple[str, str]]:
    return ((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX))


def _build(code: Mapping[str, Any], cli: Mapping[str, Any]) -> LVSASettings:
    token = _cli_values.set(dict(cli))
    try:
        return LVSASettings(**code)
    finally:
        _cli_values.reset(token)
