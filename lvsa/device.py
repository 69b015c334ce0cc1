"""The device contract: a small object that answers questions about one kind of accelerator (or the CPU),
so that drivers and benchmarks never call ``torch.cuda`` / ``torch.npu`` themselves.

Device modules register under the ``lvsa.devices`` entry-point namespace; the name is the torch device
type. Importing one never initialises the device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from .driver import Availability
    from .smi import SmiReading


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

    def smi(self) -> SmiReading | None:
        """Memory of every device of this kind as its vendor tool sees it (all processes), or ``None``
        when there is no such tool (the CPU)."""
        return None
