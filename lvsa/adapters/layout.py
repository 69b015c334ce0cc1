"""The context-parallel layout diffusers set up on a transformer (``enable_parallelism``), as the execution
wing's :class:`~lvsa.attention.ContextParallel`."""

from __future__ import annotations

from typing import Any

from ..attention import ContextParallel, RingGroup
from ..ulysses import UlyssesGroup


def context_parallel_of(transformer: Any) -> ContextParallel | None:
    """The Ulysses and ring groups of a transformer after diffusers' ``enable_parallelism``, or ``None``."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    u, r = cp.ulysses_degree or 1, cp.ring_degree or 1
    if u * r == 1:
        return None
    # diffusers builds the meshes in enable_parallelism (ContextParallelConfig.setup)
    ulysses = UlyssesGroup(cp._ulysses_mesh.get_group(), u, cp._ulysses_local_rank) if u > 1 else None
    ring = RingGroup(cp._ring_mesh.get_group(), r, cp._ring_local_rank) if r > 1 else None
    return ContextParallel(ulysses, ring)
