"""Context parallelism (Ulysses) for lvsa inside diffusers' own context parallelism: joining the process
group and enabling it on a pipeline's transformers.

diffusers shards the model's inputs and gathers its output (``enable_parallelism`` with a ``cp_plan``);
:func:`enable_context_parallel` does that with the adapter's plan, for families whose transformer has none.
The all-to-alls themselves are in :mod:`lvsa.ulysses` (re-exported here)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any, NoReturn

from . import registry
from .adapters import adapter_for, transformers_of
from .adapters.layout import context_parallel_of
from .attention.layout import ContextParallel, RingGroup, check_degrees
from .errors import ConfigError
from .ulysses import (
    UlyssesGroup,
    gather_heads,
    heads_to_sequence,
    local_heads,
    sequence_to_heads,
)

__all__ = ["ContextParallel", "RingGroup", "UlyssesGroup", "context_parallel_of", "enable_context_parallel",
           "exit_process", "gather_heads", "heads_to_sequence", "init_distributed", "leave_distributed", "local_heads",
           "sequence_to_heads", "ulysses_group_of"]


#: whether this process joined a process group through :func:`init_distributed`
_joined = False


def init_distributed(device_type: str, timeout: float = 600.0) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes, with the device module's collective backend
    (gloo on CPU, nccl on CUDA, hccl on NPU); returns ``(rank, world_size, local_rank)``.

    ``timeout`` (seconds) bounds every collective: a rank that stops or hangs makes the others fail with
    torch's timeout error after that long, instead of torch's default 30 minutes."""
    import torch.distributed as dist

    device = registry.get_device(device_type)
    if device is None:
        raise ConfigError(f"no lvsa device module for {device_type!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError("context parallelism needs several processes: launch with torchrun --nproc-per-node N")
        if device_type != "cpu":
            device.set_device(local_rank)
        dist.init_process_group(backend=device.collective_backend, timeout=timedelta(seconds=timeout))
    global _joined
    _joined = True
    return dist.get_rank(), dist.get_world_size(), local_rank


def leave_distributed(*, wait_for_peers: bool = True) -> None:
    """Destroy the process group, if one is up. A process that exits with it alive can abort in the collective
    library's teardown ("terminate called without an active exception"), and torchrun then reports the whole
    run failed: call it on every exit path of a process that :func:`init_distributed` joined.

    On a clean exit every rank first waits for the others (a rank that tears down while a peer is still at
    work, rank 0 writing its result, can abort the same way). Pass ``wait_for_peers=False`` on an error path,
    where the peers may never come; an exception on its way out counts as one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End the process with ``status``. In a process that :func:`init_distributed` joined (after
    :func:`leave_distributed`), the output streams and logging are flushed and the interpreter's finalization
    is skipped: there the collective library's worker threads can still abort a finished process ("terminate
    called without an active exception", SIGABRT), and torchrun then reports the whole run failed. Elsewhere,
    ``sys.exit(status)``."""
    if not _joined:
        sys.exit(status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def enable_context_parallel(target: Any, ulysses_degree: int = 1, *, ring_degree: int = 1, mesh: Any = None) -> None:
    """Turn on diffusers' context parallelism for every transformer of a pipeline (or one transformer):
    Ulysses over ``ulysses_degree`` ranks (it splits the heads), ring attention over ``ring_degree`` ranks (it
    splits the sequence further, past the head count), or both; with the adapter's sharding plan where the
    model has none. ``torch.distributed`` must be initialised with ``ulysses_degree x ring_degree`` ranks
    (``torchrun --nproc-per-node N``), unless ``mesh`` (a ``("ring", "ulysses")`` device mesh) is given."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    if not dist.is_initialized():
        raise ConfigError("context parallelism needs torch.distributed: launch with torchrun --nproc-per-node N")
    world = dist.get_world_size() if mesh is None else ulysses_degree * ring_degree
    check_degrees(world, ulysses_degree, ring_degree)
    if ulysses_degree * ring_degree == 1:
        raise ConfigError("ulysses_degree=1 x ring_degree=1: context parallelism needs a degree above 1")
    import torch

    for transformer in transformers_of(target):
        adapter = adapter_for(transformer)
        adapter.check_context_parallel(transformer, ulysses_degree)
        adapter.check_ring(transformer, ring_degree)
        config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, mesh=mesh)
        plan = adapter.cp_plan(transformer)
        if torch.accelerator.device_count() > 0:
            transformer.enable_parallelism(config=config, cp_plan=plan)
        else:
            _enable_on_cpu(transformer, config, plan if plan is not None else transformer._cp_plan)
        adapter.finish_context_parallel(transformer)


def ulysses_group_of(transformer: Any) -> UlyssesGroup | None:
    """The Ulysses group of a transformer after ``enable_parallelism``, or ``None``."""
    parallel = context_parallel_of(transformer)
    return parallel.ulysses if parallel else None


def _enable_on_cpu(transformer: Any, config: Any, plan: dict[str, Any]) -> None:
    """diffusers' ``enable_parallelism`` picks ``rank % accelerator_count`` as the device, which divides by zero
    on a host without accelerators (gloo). Do its three steps with a CPU mesh: set up the config, record it on
    the model and its processors, and install diffusers' own sharding hooks."""
    import torch
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    if getattr(transformer, "_parallel_config", None) is not None:
        raise ConfigError(f"context parallelism is already enabled on {type(transformer).__name__}")
    parallel = ParallelConfig(context_parallel_config=config)
    mesh = config.mesh or dist.device_mesh.init_device_mesh(
        "cpu", mesh_shape=config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = parallel
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = parallel
    apply_context_parallel(transformer, parallel.context_parallel_config, plan)
