"""Device memory as the vendor tools see it: ``nvidia-smi`` (or NVML) and ``npu-smi``.

The allocator statistics of a device module count this process's tensors; these tools count everything
on the device (other processes, the runtime's context, driver reservations), which is what runs out. Each
query returns a :class:`SmiReading`; when a tool is missing or prints something unexpected, the reading
carries a one-line ``note`` and no devices. Nothing here raises for a tool's sake."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

NVIDIA_SMI_QUERY = [
    "nvidia-smi", "--query-gpu=index,name,memory.used,memory.total", "--format=csv,noheader,nounits",
]
NPU_SMI_QUERY = ["npu-smi", "info"]

#: runs a command and returns (exit code, stdout + stderr); replaced in tests
Runner = Callable[[Sequence[str]], tuple[int, str]]


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    name: str
    used_mib: float | None
    total_mib: float | None


@dataclass(frozen=True)
class SmiReading:
    tool: str
    version: str | None = None
    devices: list[DeviceMemory] = field(default_factory=list)
    note: str | None = None  # why there are no (or partial) numbers


class SmiParseError(ValueError):
    pass


def run_command(command: Sequence[str], timeout: float = 15.0) -> tuple[int, str]:
    if shutil.which(command[0]) is None:
        return 127, f"{command[0]}: not found on PATH"
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"{command[0]}: no answer within {timeout:.0f} s"
    except OSError as error:
        return 126, f"{command[0]}: {error}"
    return done.returncode, (done.stdout or "") + (done.stderr or "")


def _number(text: str) -> float | None:
    text = text.strip().removesuffix("MiB").strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "-"):
        return None  # [N/A], [Not Supported], -
    return float(text)


# ------------------------------------------------------------------------------------------- NVIDIA
def parse_nvidia_smi_csv(text: str) -> list[DeviceMemory]:
    """``index, name, memory.used, memory.total`` rows (``--format=csv,noheader,nounits``)."""
    devices = []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if parts[0] == "index":
            continue  # a header line (a caller that dropped noheader)
        if len(parts) < 4 or not parts[0].isdigit():
            raise SmiParseError(f"unexpected nvidia-smi line: {line.strip()[:120]!r}")
        # a name may itself contain commas: the last two fields are the numbers
        name = ", ".join(parts[1:-2])
        try:
            used, total = _number(parts[-2]), _number(parts[-1])
        except ValueError:
            raise SmiParseError(f"unexpected nvidia-smi numbers: {line.strip()[:120]!r}") from None
        devices.append(DeviceMemory(int(parts[0]), name, used, total))
    if not devices:
        raise SmiParseError("nvidia-smi printed no GPU")
    return devices


def query_nvidia(runner: Runner = run_command) -> SmiReading:
    """NVML through ``nvidia-ml-py`` when it is installed, else ``nvidia-smi``."""
    nvml = _query_nvml()
    if nvml is not None:
        return nvml
    code, text = runner(NVIDIA_SMI_QUERY)
    if code != 0:
        return SmiReading("nvidia-smi", note=_first_line(text, f"nvidia-smi exited with {code}"))
    try:
        devices = parse_nvidia_smi_csv(text)
    except SmiParseError as error:
        return SmiReading("nvidia-smi", note=str(error))
    version_code, version_text = runner(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    version = version_text.strip().splitlines()[0].strip() if version_code == 0 and version_text.strip() else None
    return SmiReading("nvidia-smi", f"driver {version}" if version else None, devices)


def _query_nvml() -> SmiReading | None:
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None  # no driver: let nvidia-smi say why
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            devices.append(DeviceMemory(i, name, memory.used / 2**20, memory.total / 2**20))
        version = pynvml.nvmlSystemGetDriverVersion()
        version = version.decode() if isinstance(version, bytes) else version
        return SmiReading("nvml", f"driver {version}", devices)
    except Exception as error:
        return SmiReading("nvml", note=f"NVML query failed: {error}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------- Ascend
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
        return SmiReading("npu-smi", note=_first_line(text, f"npu-smi exited with {code}"))
    try:
        version, devices = parse_npu_smi_info(text)
    except SmiParseError as error:
        return SmiReading("npu-smi", note=str(error))
    return SmiReading("npu-smi", version, devices)


def _first_line(text: str, fallback: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:200]
    return fallback
