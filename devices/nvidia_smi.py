"""NVIDIA GPU memory as the driver sees it: NVML (``nvidia-ml-py``) when installed, else ``nvidia-smi``.

The allocator statistics of the CUDA device module count this process's tensors; these count everything on
the GPU, which is what runs out. Both number GPUs physically and ignore ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

from lvsa.device import DeviceMemory, SmiReading

from .vendor_tool import Runner, SmiParseError, first_line, number, run_command

NVIDIA_SMI_QUERY = [
    "nvidia-smi", "--query-gpu=index,name,memory.used,memory.total", "--format=csv,noheader,nounits",
]


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
            used, total = number(parts[-2]), number(parts[-1])
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
        return SmiReading("nvidia-smi", note=first_line(text, f"nvidia-smi exited with {code}"))
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
