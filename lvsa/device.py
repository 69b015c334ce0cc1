"""The device contract: a small object that answers questions about one kind of accelerator (or the CPU),
so that drivers and benchmarks never call ``torch.cuda`` / ``torch.npu`` themselves.

Device modules register under the ``lvsa.devices`` entry-point namespace; the name is the torch device
type. Importing one never initialises the device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from .driver import Availability

#: how to get torch_npu, named by the npu device module and the npu driver alike
NPU_INSTALL_HINT = "pip install 'lvsa[npu]' on a host with the CANN toolkit, then source its set_env.sh"


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    name: str
    used_mib: float | None
    total_mib: float | None


@dataclass(frozen=True)
class SmiReading:
    """Memory of every device of one kind as its vendor tool (``nvidia-smi``/NVML, ``npu-smi``) sees it:
    every process, the runtime's context and driver reservations, which is what runs out. When the tool is
    missing or prints something unexpected, ``note`` says so in one line and ``devices`` is empty."""

    tool: str
    version: str | None = None
    devices: list[DeviceMemory] = field(default_factory=list)
    note: str | None = None  # why there are no (or partial) numbers


@dataclass(frozen=True)
class MemoryStats:
    """Bytes in use and at peak. ``kind`` says what is counted: the framework's caching allocator
    (tensors of this process) or, on the CPU, the process's resident set."""

    kind: Literal["allocator", "process_rss"]
    current: int | None
    peak: int | None
    reserved: int | None = None


class Device(ABC):
    name: ClassVar[str]
    collective_backend: ClassVar[str]

    @abstractmethod
    def is_available(self) -> Availability: ...

    @abstractmethod
    def count(self) -> int: ...

    def torch_device(self, index: int = 0) -> torch.device:
        import torch

        return torch.device(self.name, index)

    @abstractmethod
    def synchronize(self, index: int | None = None) -> None: ...

    def set_device(self, index: int) -> None:
        """Make device ``index`` this process's current one (one process per device under torchrun); a
        device with one current device for all (the CPU) has nothing to do."""
        return None

    @abstractmethod
    def memory(self, index: int | None = None) -> MemoryStats: ...

    @abstractmethod
    def reset_peak(self, index: int | None = None) -> None: ...

    def describe(self, index: int = 0) -> str:
        return self.name

    def free_bytes(self, index: int | None = None) -> int | None:
        """Memory free for new work on the device now (the CPU: the system's available memory), for estimates
        made before a run; ``None`` where it cannot be known."""
        return None

    def capability(self, index: int = 0) -> tuple[int, int] | None:
        """The chip generation as ``(major, minor)`` (CUDA: the compute capability, ``(9, 0)`` on Hopper), for
        drivers whose kernels exist for some generations only; ``None`` where the notion does not apply."""
        return None

    def smi(self) -> SmiReading | None:
        """Memory of every device of this kind as its vendor tool sees it (all processes), or ``None``
        when there is no such tool (the CPU)."""
        return None
