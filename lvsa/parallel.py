"""Context parallelism (Ulysses) for lvsa inside diffusers' own context parallelism.

With Ulysses the video sequence is sharded over the ranks between layers, and an all-to-all before
attention gives every rank the whole sequence for ``heads / degree`` of the heads. The frame plan is about
the whole sequence, so it does not change: each rank runs its heads through the same driver, and a second
all-to-all gives the sequence shards back. Text tokens (HunyuanVideo 1.5, CogVideoX) are not sharded: every
rank holds all of them, takes its heads before attention and gathers the heads after.

diffusers shards the model's inputs and gathers its output (``enable_parallelism`` with a ``cp_plan``);
:func:`enable_context_parallel` does that with the adapter's plan, for families whose transformer has none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, GeometryError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class UlyssesGroup:
    group: Any  # torch.distributed ProcessGroup
    degree: int
    rank: int  # rank inside the group

    def check_heads(self, heads: int, origin: str) -> None:
        if heads % self.degree:
            raise ConfigError(
                f"{origin}: {heads} attention heads do not split over ulysses_degree={self.degree}; "
                f"use a degree that divides {heads}"
            )

    def check_tokens(self, tokens: int, latent_frames: int, patches_per_frame: int) -> None:
        if tokens % self.degree:
            raise GeometryError(
                f"{latent_frames} latent frames x {patches_per_frame} tokens = {tokens} video tokens do not "
                f"split over ulysses_degree={self.degree}; change the frame count or the size, or the degree"
            )


def ulysses_group_of(transformer: Any) -> UlyssesGroup | None:
    """The Ulysses group of a transformer after diffusers' ``enable_parallelism``, or ``None``."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    if (cp.ring_degree or 1) > 1:
        raise ConfigError(f"lvsa supports Ulysses context parallelism only, not ring_degree={cp.ring_degree}: "
                          "use ContextParallelConfig(ulysses_degree=N)")
    degree = cp.ulysses_degree or 1
    if degree == 1:
        return None
    # diffusers builds the mesh in enable_parallelism (ContextParallelConfig.setup)
    return UlyssesGroup(cp._ulysses_mesh.get_group(), degree, cp._ulysses_local_rank)


def sequence_to_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """``[B, S/n, H, D]`` sequence shards -> ``[B, S, H/n, D]``: the whole sequence for this rank's heads."""
    import torch
    import torch.distributed as dist

    b, s_local, h, d = x.shape
    n = ulysses.degree
    # [n (destination rank), B, S/n, H/n, D]: the chunk for rank r holds its heads
    send = x.reshape(b, s_local, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)
    # received[r] is rank r's sequence shard of my heads
    return received.permute(1, 0, 2, 3, 4).reshape(b, n * s_local, h // n, d)


def heads_to_sequence(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: ``[B, S, H/n, D]`` -> ``[B, S/n, H, D]``."""
    import torch
    import torch.distributed as dist

    b, s, h_local, d = x.shape
    n = ulysses.degree
    send = x.reshape(b, n, s // n, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)
    # received[r] holds rank r's heads for my sequence shard
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h_local, d)


def local_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """This rank's heads of a tensor every rank holds whole (the text tokens)."""
    h = x.shape[2] // ulysses.degree
    return x[:, :, ulysses.rank * h:(ulysses.rank + 1) * h]


def gather_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """``[B, S, H/n, D]`` on every rank -> ``[B, S, H, D]`` on every rank."""
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(ulysses.degree)]
    dist.all_gather(parts, x.contiguous(), group=ulysses.group)
    return torch.cat(parts, dim=2)


def init_distributed(device_type: str, timeout: float = 600.0) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes, with the device module's collective backend
    (gloo on CPU, nccl on CUDA, hccl on NPU); returns ``(rank, world_size, local_rank)``.

    ``timeout`` (seconds) bounds every collective: a rank that stops or hangs makes the others fail with
    torch's timeout error after that long, instead of torch's default 30 minutes."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from . import registry

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
    return dist.get_rank(), dist.get_world_size(), local_rank


def enable_context_parallel(target: Any, ulysses_degree: int, mesh: Any = None) -> None:
    """Turn on diffusers' Ulysses context parallelism for every transformer of a pipeline (or one
    transformer), with the adapter's sharding plan where the model has none. ``torch.distributed`` must be
    initialised with ``ulysses_degree`` ranks (``torchrun --nproc-per-node N``)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from .adapters import adapter_for, transformers_of

    if ulysses_degree < 1:
        raise ConfigError(f"ulysses_degree={ulysses_degree}: must be >= 1")
    if not dist.is_initialized():
        raise ConfigError("context parallelism needs torch.distributed: launch with torchrun --nproc-per-node N")
    if dist.get_world_size() % ulysses_degree:
        raise ConfigError(f"ulysses_degree={ulysses_degree} does not divide the {dist.get_world_size()} ranks")
    import torch

    for transformer in transformers_of(target):
        adapter = adapter_for(transformer)
        adapter.check_context_parallel(transformer, ulysses_degree)
        config = ContextParallelConfig(ulysses_degree=ulysses_degree, mesh=mesh)
        plan = adapter.cp_plan(transformer)
        if torch.accelerator.device_count() > 0:
            transformer.enable_parallelism(config=config, cp_plan=plan)
        else:
            _enable_on_cpu(transformer, config, plan if plan is not None else transformer._cp_plan)


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
