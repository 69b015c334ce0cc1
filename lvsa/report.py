"""``lvsa report``: everything a bug report needs, in one place, as text or JSON.

lvsa's version and git revision (when run from a checkout), the versions of torch, torch_npu, flashinfer
and diffusers (read from package metadata: nothing is imported), the devices found, every driver with
whether it can run and why not, the effective settings with where each value came from, and the memory
of each present device (allocator statistics and the vendor tool's view)."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __version__, registry
from .settings import LVSASettings, env_var, flag, get_settings

PACKAGES = ["torch", "torch-npu", "flashinfer-python", "diffusers", "pydantic", "pydantic-settings", "stevedore",
            "nvidia-ml-py"]


def git_revision() -> str | None:
    """``HEAD`` (with ``-dirty`` for local changes) when lvsa runs from a git checkout, else ``None``."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


# packages whose module may be importable without pip metadata (e.g. unpacked onto PYTHONPATH)
_MODULES = {"flashinfer-python": "flashinfer", "diffusers": "diffusers"}


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    module = _MODULES.get(package)  # never torch_npu: importing it without CANN breaks torch
    if module is None or importlib.util.find_spec(module) is None:
        return None
    try:
        return f"{getattr(importlib.import_module(module), '__version__', '?')} (no package metadata)"
    except Exception as error:
        return f"present but failed to import: {type(error).__name__}"


def collect(settings: LVSASettings | None = None, memory: bool = True) -> dict[str, Any]:
    from .driver_status import available_drivers

    settings = settings if settings is not None else get_settings()
    devices = []
    for name, plugin in registry.device_plugins().items():
        entry: dict[str, Any] = {"name": name, "target": plugin.target}
        device = plugin.obj
        if device is None:
            entry.update(available=False, reason=plugin.error)
            devices.append(entry)
            continue
        try:
            availability = device.is_available()
            entry.update(available=availability.ok, reason=availability.reason,
                         collective_backend=device.collective_backend)
            if availability.ok:
                entry["count"] = device.count()
                if memory:
                    stats = device.memory()
                    entry["allocator"] = asdict(stats)
                    reading = device.smi()
                    entry["smi"] = None if reading is None else asdict(reading)
        except Exception as error:  # a report must come out even when a device module misbehaves
            entry.update(available=False, reason=f"{type(error).__name__}: {error}")
        devices.append(entry)
    return {
        "lvsa": {"version": __version__, "git_revision": git_revision(), "location": str(Path(__file__).parent)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "devices": devices,
        # drivers on the devices present here (absent devices say why in "devices")
        "drivers": [asdict(row) for row in available_drivers()
                    if any(d["name"] == row.device and d.get("available") for d in devices)],
        "settings": {
            name: {"value": getattr(settings, name), "source": settings.source_of(name), "env": env_var(name),
                   "flag": flag(name)}
            for name in type(settings).model_fields
        },
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"lvsa {report['lvsa']['version']} (git {report['lvsa']['git_revision'] or 'n/a: not a checkout'})",
             f"python {report['python']} on {report['platform']}", "", "packages:"]
    for name, version in report["packages"].items():
        lines.append(f"  {name:<18} {version or 'not installed'}")
    lines += ["", "devices:"]
    for d in report["devices"]:
        state = "present" if d.get("available") else "absent"
        lines.append(f"  {d['name']:<6} {state:<8} {d.get('reason') or ''}")
        if d.get("allocator"):
            a = d["allocator"]
            lines.append(f"         allocator ({a['kind']}): current {_mib(a['current'])}, peak {_mib(a['peak'])}")
        smi = d.get("smi")
        if smi:
            if smi["note"]:
                lines.append(f"         {smi['tool']}: {smi['note']}")
            for m in smi["devices"]:
                lines.append(f"         {smi['tool']} {m['index']} {m['name']}: {_num(m['used_mib'])} / "
                             f"{_num(m['total_mib'])} MiB used")
    lines += ["", "drivers:"]
    for r in report["drivers"]:
        state = "usable" if r["available"] else "unusable"
        lines.append(f"  {r['name']:<11} {r['device']:<5} {state:<9} {r['reason']}")
    lines += ["", "settings (value, source):"]
    for name, s in report["settings"].items():
        lines.append(f"  {name:<24} {s['value']!s:<10} {s['source']:<8} {s['env']} / {s['flag']}")
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
