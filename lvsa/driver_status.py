"""Which drivers can run here, and why not: the rows of ``lvsa drivers``, of ``lvsa report`` and of the
error that lists every installed driver. A broken driver or device module reads as a reason, never as a crash."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import registry

if TYPE_CHECKING:
    from .driver import AttentionProblem


@dataclass(frozen=True)
class DriverStatus:
    """One row of ``lvsa drivers``: can this driver run on this device here, and if not, why."""

    name: str
    device: str
    available: bool
    reason: str
    #: ok, driver_not_installed, driver_load_failed, device_absent, driver_unavailable, unsupported_problem
    code: str
    priority: int
    target: str
    distribution: str | None
    capabilities: str


def _device_reason(device_type: str) -> str | None:
    """Why ``device_type`` cannot be used here, or ``None`` when it can (or has no device module)."""
    device = registry.get_device(device_type)
    if device is None:
        return None
    try:
        availability = device.is_available()
    except Exception as error:  # a broken device module must not break a listing
        return f"device {device_type}: {type(error).__name__}: {error}"
    return None if availability else f"device {device_type} absent: {availability.reason}"


def driver_status(name: str, device_type: str, problem: AttentionProblem | None = None,
                  lse: bool = False) -> DriverStatus:
    """``lse``: the driver must also run ring attention's steps (:meth:`~lvsa.driver.Driver.check_lse`)."""
    plugin = registry.driver_plugins().get(name)
    if plugin is None:
        installed = ", ".join(registry.driver_plugins()) or "none"
        return DriverStatus(name, device_type, False, f"not installed (installed: {installed})",
                             "driver_not_installed", 0, "-", None, "")
    driver = plugin.obj
    if driver is None:
        return DriverStatus(name, device_type, False, plugin.error or "failed to load", "driver_load_failed",
                             0, plugin.target, plugin.distribution, "")

    def status(available: bool, reason: str, code: str) -> DriverStatus:
        return DriverStatus(name, device_type, available, reason, code, driver.priority, plugin.target,
                             plugin.distribution, driver.capabilities())

    absent = _device_reason(device_type)
    if absent is not None:
        return status(False, absent, "device_absent")
    try:
        availability = driver.is_available(device_type)
    except Exception as error:  # a driver's own bug must read as a reason, not break the caller
        return status(False, f"availability check raised {type(error).__name__}: {error}", "driver_unavailable")
    if not availability:
        return status(False, availability.reason, "driver_unavailable")
    problems = driver.check(problem) if problem is not None else []
    if lse and problem is not None:
        problems += driver.check_lse(problem)
    if problems:
        return status(False, "; ".join(problems), "unsupported_problem")
    return status(True, availability.reason, "ok")


def available_drivers(device: str | None = None) -> list[DriverStatus]:
    """Every registered driver and whether it can run here. ``device`` is a torch device type
    (``"cpu"``, ``"cuda"``, ...); by default every registered device is listed, present or not."""
    names = list(registry.driver_plugins())
    device_types = [device] if device else list(registry.device_plugins()) or ["cpu"]
    return [driver_status(n, d) for d in device_types for n in names]


def status_table(device_type: str, problem: AttentionProblem | None, lse: bool = False) -> str:
    """One line per installed driver: usable or not on ``device_type`` for ``problem``, and why."""
    rows = [driver_status(n, device_type, problem, lse) for n in registry.driver_plugins()]
    if not rows:
        return "  (no driver is installed: is lvsa installed with pip, so that its entry points exist?)"
    return "\n".join(
        f"  {r.name:<12} {'usable' if r.available else 'unusable':<9} {r.reason}" for r in rows
    )
