"""Device modules: found by entry point, answer without touching torch.cuda from callers."""

from __future__ import annotations

import torch

from lvsa import registry


def test_cpu_and_cuda_modules_are_registered():
    devices = registry.devices()
    assert {"cpu", "cuda"} <= set(devices)
    assert devices["cpu"].collective_backend == "gloo"
    assert devices["cuda"].collective_backend == "nccl"


def test_cpu_reports_memory_of_the_process():
    cpu = registry.get_device("cpu")
    before = cpu.memory()
    block = torch.ones(64, 1024, 1024, dtype=torch.uint8)  # 64 MiB, touched
    after = cpu.memory()
    assert before.kind == "process_rss" and after.peak >= before.peak
    assert after.current is None or after.current >= 32 << 20
    del block
    assert cpu.is_available() and cpu.count() == 1
    cpu.synchronize()
    assert cpu.torch_device() == torch.device("cpu", 0)


def test_cuda_says_why_it_is_absent_or_reports_allocator_memory():
    cuda = registry.get_device("cuda")
    availability = cuda.is_available()
    if not availability:
        assert availability.reason and cuda.count() == 0
    else:
        cuda.reset_peak(0)
        x = torch.ones(1 << 20, device="cuda")
        cuda.synchronize(0)
        stats = cuda.memory(0)
        assert stats.kind == "allocator" and stats.peak >= x.numel() * 4


def test_cpu_says_how_much_memory_is_free():
    """What the example's estimate compares with: the system's available memory, below its total."""
    import os

    free = registry.get_device("cpu").free_bytes()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert free is not None and 0 < free <= total
