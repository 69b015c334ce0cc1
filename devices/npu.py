"""Ascend NPUs through torch_npu: detection, synchronisation, allocator statistics, HCCL, npu-smi.

torch_npu is imported only when a question needs it (never at ``import lvsa``): it links the CANN
libraries, and a host without them must still be able to list drivers and devices and read why."""

from __future__ import annotations

import importlib.util

from lvsa.device import NPU_INSTALL_HINT as INSTALL_HINT
from lvsa.device import Device, MemoryStats, SmiReading
from lvsa.driver import Availability

from .npu_smi import query_npu


def import_torch_npu():
    """Import torch_npu (which registers ``torch.npu``); raises what the import raises."""
    import torch_npu

    return torch_npu


class NpuDevice(Device):
    name = "npu"
    collective_backend = "hccl"

    def is_available(self) -> Availability:
        if importlib.util.find_spec("torch_npu") is None:
            return Availability.no(f"torch_npu is not installed ({INSTALL_HINT})")
        try:
            import_torch_npu()
        except Exception as error:  # usually CANN libraries missing from the library path
            return Availability.no(f"torch_npu failed to import: {type(error).__name__}: {error} ({INSTALL_HINT})")
        import torch

        if not torch.npu.is_available():
            return Availability.no("no NPU visible (check ASCEND_RT_VISIBLE_DEVICES and `npu-smi info`)")
        return Availability.yes(f"{torch.npu.device_count()} x {torch.npu.get_device_name(0)}")

    def count(self) -> int:
        return torch_npu_module().npu.device_count() if self.is_available() else 0

    def synchronize(self, index: int | None = None) -> None:
        torch_npu_module().npu.synchronize(index)

    def set_device(self, index: int) -> None:
        torch_npu_module().npu.set_device(index)

    def memory(self, index: int | None = None) -> MemoryStats:
        npu = torch_npu_module().npu
        return MemoryStats(
            kind="allocator",
            current=npu.memory_allocated(index),
            peak=npu.max_memory_allocated(index),
            reserved=npu.memory_reserved(index),
        )

    def free_bytes(self, index: int | None = None) -> int | None:
        return int(torch_npu_module().npu.mem_get_info(index)[0])  # torch_npu mirrors torch.cuda.mem_get_info

    def reset_peak(self, index: int | None = None) -> None:
        torch_npu_module().npu.reset_peak_memory_stats(index)

    def describe(self, index: int = 0) -> str:
        return torch_npu_module().npu.get_device_name(index)

    def smi(self) -> SmiReading:
        return query_npu()


def torch_npu_module():
    """``torch`` with ``torch.npu`` registered (importing torch_npu first)."""
    import_torch_npu()
    import torch

    return torch
