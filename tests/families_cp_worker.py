"""torchrun worker for tests/test_families.py: one declared family's transformer under lvsa with context
parallelism on CPU (gloo). Arguments: model folder, class name, inputs file, output file, ulysses degree, ring
degree, and ``per_frame`` for a timestep per latent frame. Rank 0 writes the output."""

from __future__ import annotations

import sys

import diffusers
import torch

import lvsa
from lvsa.parallel import enable_context_parallel, init_distributed, leave_distributed


def timestep_of(kwargs: dict, t: float, per_frame: bool) -> torch.Tensor:
    """Two samples' timestep: one each, or one per latent frame ([B, 1, F, 1, 1], Cosmos Video2World's)."""
    if per_frame:
        frames = kwargs["hidden_states"].shape[2]
        return torch.full((2, 1, frames, 1, 1), t) * torch.linspace(0.5, 1, frames).view(1, 1, frames, 1, 1)
    return torch.full((2,), t)


def main(folder: str, cls: str, inputs: str, out: str, ulysses: int, ring: int, per_frame: bool = False) -> None:
    rank, _world, _local = init_distributed("cpu")
    try:
        model = getattr(diffusers, cls).from_pretrained(folder).eval()
        enable_context_parallel(model, ulysses, ring_degree=ring)
        handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
        kwargs = torch.load(inputs)
        with torch.no_grad():
            # every output of the forward (LTX-2's audio beside its video)
            outputs = [model(**kwargs, timestep=timestep_of(kwargs, t, per_frame), return_dict=False)
                       for t in (999.0, 500.0)]
        if rank == 0:
            torch.save({"outputs": outputs, "sparse_calls": handle.stats.sparse_calls,
                        "ulysses": handle.stats.ulysses_degree, "ring": handle.stats.ring_degree}, out)
    finally:
        leave_distributed()


if __name__ == "__main__":
    folder, cls, inputs, out, ulysses, ring = sys.argv[1:7]
    main(folder, cls, inputs, out, int(ulysses), int(ring), per_frame=sys.argv[7:8] == ["per_frame"])
