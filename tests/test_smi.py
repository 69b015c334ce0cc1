"""Parsing of recorded nvidia-smi / npu-smi outputs (tests/data/smi), including the failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvsa.device import DeviceMemory
from lvsa.devices import npu_smi, nvidia_smi, vendor_tool

DATA = Path(__file__).resolve().parent / "data" / "smi"


def read(name: str) -> str:
    return (DATA / name).read_text()


def runner_for(name: str, code: int = 0):
    calls = []

    def run(command):
        calls.append(list(command))
        if "--query-gpu=driver_version" in " ".join(command):
            return 0, "580.159.04\n"
        return code, read(name)

    run.calls = calls
    return run


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch):
    monkeypatch.setattr(nvidia_smi, "_query_nvml", lambda: None)


def test_h100():
    assert nvidia_smi.parse_nvidia_smi_csv(read("nvidia_h100.csv")) == [
        DeviceMemory(0, "NVIDIA H100 80GB HBM3", 0.0, 81559.0)
    ]


def test_two_gpus_and_the_driver_version():
    reading = nvidia_smi.query_nvidia(runner_for("nvidia_h200_x2.csv"))
    assert [d.used_mib for d in reading.devices] == [1324.0, 98342.0]
    assert reading.version == "driver 580.159.04" and reading.note is None


def test_not_available_values_become_none():
    (device,) = nvidia_smi.parse_nvidia_smi_csv(read("nvidia_unified_memory.csv"))
    assert device.used_mib is None and device.total_mib is None and device.name == "NVIDIA GB10"


def test_header_line_is_skipped():
    (device,) = nvidia_smi.parse_nvidia_smi_csv(read("nvidia_with_header.csv"))
    assert device.total_mib == 81920.0


def test_driver_failure_is_a_note_not_a_crash():
    reading = nvidia_smi.query_nvidia(runner_for("nvidia_driver_error.txt", code=9))
    assert reading.devices == [] and reading.note.startswith("NVIDIA-SMI has failed")


def test_missing_tool_is_a_note():
    reading = nvidia_smi.query_nvidia(lambda command: (127, "nvidia-smi: not found on PATH"))
    assert reading.note == "nvidia-smi: not found on PATH"
    assert npu_smi.query_npu(lambda command: (127, "npu-smi: not found on PATH")).note == "npu-smi: not found on PATH"


def test_garbage_is_a_note():
    reading = nvidia_smi.query_nvidia(lambda command: (0, "Segmentation fault\n"))
    assert reading.devices == [] and "unexpected nvidia-smi line" in reading.note


def test_npu_910b3_hbm_without_space_before_slash():
    version, devices = npu_smi.parse_npu_smi_info(read("npu_910b3_24.1.txt"))
    assert version == "24.1.rc1.b030"
    assert devices == [DeviceMemory(0, "910B3", 3318.0, 65536.0), DeviceMemory(1, "910B3", 59356.0, 65536.0)]


def test_npu_ids_need_not_start_at_zero_and_the_process_table_is_ignored():
    version, devices = npu_smi.parse_npu_smi_info(read("npu_910b_23.0_container.txt"))
    assert version == "23.0.2" and [d.index for d in devices] == [6, 7]
    assert devices[0].used_mib == 61234.0


def test_npu_310p_has_no_hbm_column():
    _, (device,) = npu_smi.parse_npu_smi_info(read("npu_310p3.txt"))
    assert device == DeviceMemory(8, "310P3", 1661.0, 21527.0)


def test_npu_a3_chips_are_summed_per_npu():
    _, devices = npu_smi.parse_npu_smi_info(read("npu_a3_two_chips.txt"))
    assert devices == [DeviceMemory(0, "Ascend910", 3404.0 + 40911.0, 2 * 65536.0)]


def test_npu_error_output_is_a_note():
    reading = npu_smi.query_npu(runner_for("npu_device_busy.txt"))
    assert reading.devices == [] and reading.note == "npu-smi printed no NPU table"
    reading = npu_smi.query_npu(runner_for("npu_device_busy.txt", code=255))
    assert "ret is -8020" in reading.note


def test_run_command_reports_a_missing_tool():
    code, text = vendor_tool.run_command(["lvsa-no-such-tool-xyz"])
    assert code == 127 and "not found" in text
