"""NVIDIA GPUs through torch.cuda: detection, synchronisation, caching-allocator statistics, NCCL."""

from __future__ import annotations

from lvsa.device import Device, MemoryStats, SmiReading
from lvsa.driver import Availability

from .nvidia_smi import query_nvidia


class CudaDevice(Device):
    name = "cuda"
    collective_backend = "nccl"

    def is_available(self) -> Availability:
        import torch

        if torch.version.cuda is None:
            return Availability.no(f"torch {torch.__version__} is a build without CUDA")
        if not torch.cuda.is_available():
            return Availability.no("no CUDA device visible (check the driver and CUDA_VISIBLE_DEVICES)")
        return Availability.yes(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")

    def count(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def synchronize(self, index: int | None = None) -> None:
        import torch

        torch.cuda.synchronize(index)

    def set_device(self, index: int) -> None:
        import torch

        torch.cuda.set_device(index)

    def memory(self, index: int | None = None) -> MemoryStats:
        import torch

        return MemoryStats(
            kind="allocator",
            current=torch.cuda.memory_allocated(index),
            peak=torch.cuda.max_memory_allocated(index),
            reserved=torch.cuda.memory_reserved(index),
        )

    def free_bytes(self, index: int | None = None) -> int | None:
        import torch

        return int(torch.cuda.mem_get_info(index)[0])

    def reset_peak(self, index: int | None = None) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(index)

    def describe(self, index: int = 0) -> str:
        import torch

        return torch.cuda.get_device_name(index)

    def capability(self, index: int = 0) -> tuple[int, int]:
        import torch

        return torch.cuda.get_device_capability(index)

    def smi(self) -> SmiReading:
        """NVML (nvidia-ml-py) when installed, else ``nvidia-smi``. Both number GPUs physically and ignore
        CUDA_VISIBLE_DEVICES."""
        return query_nvidia()
