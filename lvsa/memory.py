"""Memory of a run: the allocator's peak (this process's tensors) and the device's peak as the vendor tool
sees it (everything on the device), sampled by a background thread at a fixed interval.

    with MemorySampler(device, interval=0.5) as sampler:
        run()
    report = memory_report(device, sampler)
    write_report(report, output.with_suffix(".memory.json"))
    for line in summary_lines(report): print(line)
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .device import Device, DeviceMemory, SmiReading
from .files import atomic_write


@dataclass
class MemorySample:
    seconds: float  # since the sampler started
    devices: list[DeviceMemory]


@dataclass
class MemorySampler:
    """Reads ``device.smi()`` every ``interval`` seconds on a daemon thread until stopped. A tool that is
    missing or unreadable is noted once and sampling stops; the run goes on."""

    device: Device
    interval: float = 0.5
    samples: list[MemorySample] = field(default_factory=list)
    tool: str | None = None
    version: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError(f"interval={self.interval}: must be > 0")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def start(self) -> MemorySampler:
        if self._thread is not None:
            raise RuntimeError("the sampler is already running")
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="lvsa-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 3 * self.interval))
        self._read()  # one last reading at the end of the run

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._read():
                return
            self._stop.wait(self.interval)

    def _read(self) -> bool:
        if self.note is not None:
            return False
        try:
            reading: SmiReading | None = self.device.smi()
        except Exception as error:  # a tool's failure must never end the run
            self.note = f"{type(error).__name__}: {error}"
            return False
        if reading is None:
            self.note = f"no memory tool for {self.device.name}"
            return False
        self.tool, self.version = reading.tool, reading.version
        if reading.note is not None:
            self.note = reading.note
            return False
        self.samples.append(MemorySample(time.monotonic() - self._start, reading.devices))
        return True

    def peaks(self) -> dict[int, DeviceMemory]:
        """Highest used memory seen per device index."""
        best: dict[int, DeviceMemory] = {}
        for sample in self.samples:
            for d in sample.devices:
                if d.used_mib is not None and (d.index not in best or d.used_mib > (best[d.index].used_mib or 0)):
                    best[d.index] = d
        return best


def memory_report(device: Device, sampler: MemorySampler | None, index: int | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict: allocator peak, device peak per device, samples, tool version."""
    try:
        stats = device.memory(index)
        allocator = {"kind": stats.kind, "peak_bytes": stats.peak, "current_bytes": stats.current,
                     "reserved_bytes": stats.reserved}
    except Exception as error:
        allocator = {"kind": None, "peak_bytes": None, "note": f"{type(error).__name__}: {error}"}
    report: dict[str, Any] = {"device": device.name, "allocator_peak": allocator}
    if sampler is not None:
        report["device_peak"] = [asdict(d) for d in sampler.peaks().values()]
        report["samples"] = [asdict(s) for s in sampler.samples]
        report["interval_s"] = sampler.interval
        report["tool"] = {"name": sampler.tool, "version": sampler.version}
        report["note"] = sampler.note
    return report


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically (a temporary file renamed into place) and return the absolute path."""
    return atomic_write(path, lambda temporary: temporary.write_text(json.dumps(report, indent=2)))


def summary_lines(report: dict[str, Any]) -> list[str]:
    allocator = report.get("allocator_peak") or {}
    peak = allocator.get("peak_bytes")
    what = "process resident set" if allocator.get("kind") == "process_rss" else "this process's tensors"
    lines = [f"[LVSA] memory: allocator peak {_gib(peak)} ({what})"]
    for d in report.get("device_peak") or []:
        total = f" of {d['total_mib'] / 1024:.1f} GiB" if d.get("total_mib") else ""
        tool = (report.get("tool") or {}).get("name") or "tool"
        lines.append(f"[LVSA] memory: {report['device']}:{d['index']} peak {d['used_mib'] / 1024:.1f} GiB{total} "
                     f"({tool}, all processes)")
    if report.get("note"):
        lines.append(f"[LVSA] memory: no device-level figures: {report['note']}")
    return lines


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"
