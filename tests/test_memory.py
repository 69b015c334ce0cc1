"""Memory sampling and reports: a sampler thread that records the device's peak and stops cleanly, a JSON
report, and notes (never crashes) when the vendor tool is missing or unreadable."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lvsa import registry
from lvsa.device import DeviceMemory, MemoryStats, SmiReading
from lvsa.memory import MemorySampler, memory_report, summary_lines, write_report


class ScriptedDevice:
    """A device whose vendor tool reports the used memory from a script of values."""

    name = "cuda"

    def __init__(self, used, note_after=None):
        self.used = list(used)
        self.reads = 0
        self.note_after = note_after

    def smi(self):
        self.reads += 1
        if self.note_after is not None and self.reads > self.note_after:
            return SmiReading("nvidia-smi", note="NVIDIA-SMI has failed")
        value = self.used[min(self.reads - 1, len(self.used) - 1)]
        return SmiReading("nvidia-smi", "driver 580", [DeviceMemory(0, "GPU", value, 81559.0),
                                                        DeviceMemory(1, "GPU", 10.0, 81559.0)])

    def memory(self, index=None):
        return MemoryStats("allocator", current=1 << 30, peak=3 << 30, reserved=4 << 30)


def test_sampler_records_the_peak_and_stops():
    device = ScriptedDevice([100.0, 900.0, 5000.0, 700.0])
    with MemorySampler(device, interval=0.01) as sampler:
        deadline = time.monotonic() + 5
        while device.reads < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not any(t.name == "lvsa-memory-sampler" and t.is_alive() for t in threading.enumerate())
    assert sampler.peaks()[0].used_mib == 5000.0 and sampler.peaks()[1].used_mib == 10.0
    times = [s.seconds for s in sampler.samples]
    assert times == sorted(times) and len(times) >= 4


def test_report_json_and_summary(tmp_path):
    device = ScriptedDevice([2048.0])
    with MemorySampler(device, interval=0.01) as sampler:
        pass
    report = memory_report(device, sampler)
    path = write_report(report, tmp_path / "out" / "run.memory.json")
    data = json.loads(path.read_text())
    assert path.is_absolute() and data["allocator_peak"]["peak_bytes"] == 3 << 30
    assert data["device_peak"][0]["used_mib"] == 2048.0 and data["tool"] == {"name": "nvidia-smi",
                                                                            "version": "driver 580"}
    lines = summary_lines(data)
    assert lines[0] == "[LVSA] memory: allocator peak 3.00 GiB (this process's tensors)"
    assert "cuda:0 peak 2.0 GiB of 79.6 GiB (nvidia-smi, all processes)" in lines[1]
    assert not list(path.parent.glob(".run.memory.json.*")), "temporary file left behind"


def test_a_failing_tool_is_noted_once_and_sampling_stops():
    device = ScriptedDevice([100.0], note_after=1)
    with MemorySampler(device, interval=0.01) as sampler:
        time.sleep(0.1)
    assert sampler.note == "NVIDIA-SMI has failed" and device.reads == 2
    assert "no device-level figures: NVIDIA-SMI has failed" in summary_lines(memory_report(device, sampler))[-1]


def test_a_raising_tool_never_ends_the_run():
    class Broken(ScriptedDevice):
        def smi(self):
            raise OSError("boom")

    with MemorySampler(Broken([]), interval=0.01) as sampler:
        pass
    assert sampler.note == "OSError: boom" and sampler.samples == []


def test_cpu_has_no_device_tool():
    cpu = registry.get_device("cpu")
    with MemorySampler(cpu, interval=0.01) as sampler:
        pass
    report = memory_report(cpu, sampler)
    assert report["allocator_peak"]["kind"] == "process_rss" and report["device_peak"] == []


def test_bad_interval():
    with pytest.raises(ValueError):
        MemorySampler(registry.get_device("cpu"), interval=0)
