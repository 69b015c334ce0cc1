"""The settings schema: one object for every knob, from ``LVSA_*`` environment variables, command-line flags,
and code, each value remembering where it came from.

Precedence, highest first: CLI flag > environment variable > code (:func:`lvsa.configure` or keyword
arguments) > model default (filled in by the model family when a plan is made) > the field's default.
:meth:`LVSASettings.source_of` tells a value's source, so an error or a bug report can say
``LVSA_SPARSITY_SCALE=-1 (environment)`` rather than only the field name."""

from __future__ import annotations

import argparse
import difflib
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .. import caches, log, plugin_names
from ..dense import format_layer_ranges, parse_layer_ranges
from ..errors import ConfigError
from .flags import ENV_PREFIX, env_var, flag, parse_flags
from .layers import configured

Source = Literal["default", "model", "code", "env", "cli"]

# LVSA_* names that are not settings but are still legitimate: no "unknown variable" warning for them.
# Programs around the library (the test suite, the example application) add theirs: declare_variables().
_NON_SETTING_VARIABLES: dict[str, str] = {}
# variables the original tool's guides tell users to set that lvsa does not need: said once, with why
_NOT_NEEDED_VARIABLES = {
    "LVSA_WAN_HOOK": "lvsa plans Wan's whole sequence before any sharding, so the original tool's Wan hook has "
                     "no counterpart; it has no effect",
}
_DEPRECATED = {
    "schedule_start": "LVSA_SCHEDULE_START",
    "schedule_end": "LVSA_SCHEDULE_END",
}


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
    # quality controls: layer calls that run dense whatever the plan says (lvsa.dense)
    dense_warmup_steps: int | None = Field(
        None, ge=0, description="leading denoising steps that run dense, as a count (or use the fraction)")
    dense_warmup_fraction: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="leading fraction of the denoising steps that run dense (0.2: the first 20 percent)")
    dense_layers: str | None = Field(
        None, description="self-attention layers that run dense in every step: indices and ranges, e.g. 0-1,28-29")
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
        # __init__ stacks the layers itself (CLI > environment > code), so that it knows each value's source.
        # No .env file and no secrets directory: one place less to look.
        return (init_settings,)

    def __init__(self, _cli: Mapping[str, Any] | None = None, **values: Any) -> None:
        """``values`` are set in code; ``_cli`` (the command line's values, :meth:`from_cli`) beat the
        environment, which beats code."""
        cli = dict(_cli or {})
        env = _environment_values(type(self))
        try:
            super().__init__(**{**values, **env, **cli})
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
        installed = _installed_drivers()
        if name != "auto" and installed and name not in installed:
            close = difflib.get_close_matches(name, sorted(installed), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            known = ", ".join(sorted(installed))
            raise ValueError(f"{name!r} is no installed driver{hint}: use auto or one of {known}")
        return name

    @field_validator("dense_layers")
    @classmethod
    def _dense_layers(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return format_layer_ranges(parse_layer_ranges(value))

    @model_validator(mode="after")
    def _one_dense_warmup(self) -> LVSASettings:
        if self.dense_warmup_steps is not None and self.dense_warmup_fraction is not None:
            raise ValueError(
                f"the dense warm-up is given twice, as dense_warmup_steps={self.dense_warmup_steps} "
                f"(LVSA_DENSE_WARMUP_STEPS, --dense-warmup-steps) and dense_warmup_fraction="
                f"{self.dense_warmup_fraction} (LVSA_DENSE_WARMUP_FRACTION, --dense-warmup-fraction): give one")
        return self

    # ----------------------------------------------------------------------------------------------
    def source_of(self, field: str) -> Source:
        """Where the value of ``field`` came from: default, model, code, env or cli."""
        if field not in type(self).model_fields:
            raise KeyError(field)
        return self._sources.get(field, "default")

    def given_as(self, field: str) -> str:
        """How the user gave ``field``, for messages that must name what they set: ``--patch-size 2``,
        ``LVSA_PATCH_SIZE=2``, ``patch_size=2 (code)``; the value alone for a default or a model's value."""
        value = getattr(self, field)
        source = self.source_of(field)
        if source == "cli":
            return f"{flag(field, type(self))} {value}"
        if source == "env":
            return f"{env_var(field)}={os.environ.get(env_var(field), value)}"
        return f"{field}={value!r} ({source})"

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
            given = parse_flags(args, cls)
        return cls(_cli={**configured.cli, **given}, **{**configured.code, **code})


# --------------------------------------------------------------------------------------------------
# errors and warnings


def _installed_drivers() -> frozenset[str]:
    """The driver names lvsa knows, without loading a driver (entry points and in-process plugins)."""
    return plugin_names.names(plugin_names.DRIVERS_NAMESPACE)


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


def _forget_warnings() -> None:
    with _warn_lock:
        _warned.clear()


caches.register("settings-warnings", _forget_warnings)


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.logger.warning(message)


def _warn_deprecated(settings: LVSASettings) -> None:
    for field, variable in _DEPRECATED.items():
        if field in settings.model_fields_set:
            _warn_once(
                variable,
                f"[LVSA] {variable} / {flag(field)} is deprecated and has no effect in lvsa; "
                f"use LVSA_SPARSITY_SCALE (--sparsity-scale) to trade quality for speed, and "
                f"LVSA_DENSE_WARMUP_FRACTION (--dense-warmup-fraction) to run the first steps dense",
            )
    if _has_lvsa_environment():
        known = {env_var(name) for cls in _settings_classes() for name in cls.model_fields}
        for key in os.environ:
            upper = key.upper()
            if upper in _NOT_NEEDED_VARIABLES:
                _warn_once(upper, f"[LVSA] {key}={os.environ[key]} is not needed: {_NOT_NEEDED_VARIABLES[upper]}")
            elif upper.startswith(ENV_PREFIX) and upper not in known and upper not in _NON_SETTING_VARIABLES:
                guess = difflib.get_close_matches(upper, sorted(known), n=1)
                hint = f"; did you mean {guess[0]}?" if guess else ""
                _warn_once(upper, f"[LVSA] unknown environment variable {key} is ignored{hint}")


def _settings_classes() -> list[type[LVSASettings]]:
    """LVSASettings and the applications' subclasses imported in this process (their variables are known)."""
    found, pending = [], [LVSASettings]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
