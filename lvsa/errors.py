"""Exceptions of lvsa. All derive from :class:`LVSAError`; each is also the builtin that fits it, so callers
that catch ``ValueError`` / ``RuntimeError`` keep working."""

from __future__ import annotations


class LVSAError(Exception):
    """Base class of every error lvsa raises on purpose."""


class ConfigError(LVSAError, ValueError):
    """A setting has an invalid value; the message names the field, its LVSA_* variable and its flag."""


class GeometryError(LVSAError, ValueError):
    """The tensors or the video size do not match the geometry a plan was made for."""


class DriverUnavailable(LVSAError, RuntimeError):
    """The requested driver is not installed or cannot run here; the message lists every installed driver."""
