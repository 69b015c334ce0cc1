"""Ascend NPU memory as ``npu-smi info`` shows it (every process, HBM used/total per NPU)."""

from __future__ import annotations

import re

from lvsa.device import DeviceMemory, SmiReading

from .vendor_tool import Runner, SmiParseError, first_line, run_command

NPU_SMI_QUERY = ["npu-smi", "info"]
_PAIR = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")
_VERSION = re.compile(r"npu-smi\s+(\S+)")
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")


def parse_npu_smi_info(text: str) -> tuple[str | None, list[DeviceMemory]]:
    """The device table of ``npu-smi info``: each NPU has a summary row (``| id name | health | ...``)
    followed by one row per chip (``| chip | bus id | aicore memory hbm |``). HBM used/total is the last
    ``used / total`` pair of a chip row (cards without HBM, such as the 310P, show only their memory);
    chips of one NPU (Atlas A3 has two) are summed."""
    version_match = _VERSION.search(text)
    version = version_match.group(1) if version_match else None
    devices: list[DeviceMemory] = []
    current: tuple[int, str] | None = None
    used: list[float] = []
    total: list[float] = []
    in_processes = False

    def flush() -> None:
        if current is None:
            return
        chip = DeviceMemory(current[0], current[1], sum(used) if used else None, sum(total) if total else None)
        if devices and devices[-1].index == chip.index:  # the next chip of the same NPU (Atlas A3)
            last = devices.pop()
            chip = DeviceMemory(chip.index, last.name, _add(last.used_mib, chip.used_mib),
                                _add(last.total_mib, chip.total_mib))
        devices.append(chip)

    for line in text.splitlines():
        if "Process id" in line or "Process name" in line:
            in_processes = True  # the process table that follows is not the device table
        if in_processes or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        first = cells[0].split()
        if not first or not first[0].isdigit():
            continue  # header rows
        if _BUS_ID.search(cells[1]):
            if current is None:
                raise SmiParseError(f"npu-smi chip row before any NPU row: {line.strip()[:120]!r}")
            pairs = _PAIR.findall(cells[-1])
            if not pairs:
                raise SmiParseError(f"npu-smi chip row without memory figures: {line.strip()[:120]!r}")
            chip_used, chip_total = pairs[-1]  # HBM where the card has it, else its only memory column
            used.append(float(chip_used))
            total.append(float(chip_total))
        elif len(first) >= 2 and not first[1].isdigit():
            flush()  # an NPU summary row: "id name" | health | power, temperature, hugepages
            current, used, total = (int(first[0]), " ".join(first[1:])), [], []
    flush()
    if not devices:
        raise SmiParseError("npu-smi printed no NPU table")
    return version, devices


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


def query_npu(runner: Runner = run_command) -> SmiReading:
    code, text = runner(NPU_SMI_QUERY)
    if code != 0:
        return SmiReading("npu-smi", note=first_line(text, f"npu-smi exited with {code}"))
    try:
        version, devices = parse_npu_smi_info(text)
    except SmiParseError as error:
        return SmiReading("npu-smi", note=str(error))
    return SmiReading("npu-smi", version, devices)
