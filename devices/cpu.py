"""The CPU: always present; memory is the process's resident set (there is no tensor allocator to ask)."""

from __future__ import annotations

import os
import resource
import sys

from lvsa.device import Device, MemoryStats
from lvsa.driver import Availability


class CpuDevice(Device):
    name = "cpu"
    collective_backend = "gloo"

    def is_available(self) -> Availability:
        return Availability.yes(f"{os.cpu_count()} cores")

    def count(self) -> int:
        return 1

    def synchronize(self, index: int | None = None) -> None:
        """CPU kernels run synchronously; nothing to wait for."""

    def memory(self, index: int | None = None) -> MemoryStats:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in KiB on Linux, bytes on macOS
        peak_bytes = peak if sys.platform == "darwin" else peak * 1024
        return MemoryStats(kind="process_rss", current=_current_rss(), peak=peak_bytes)

    def reset_peak(self, index: int | None = None) -> None:
        """The kernel keeps the resident-set peak for the life of the process; it cannot be reset."""

    def free_bytes(self, index: int | None = None) -> int | None:
        try:  # MemAvailable: free memory plus what the kernel can reclaim (caches), as the OOM killer sees it
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def describe(self, index: int = 0) -> str:
        import platform

        return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
