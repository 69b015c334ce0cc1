"""The context-parallel layout of a forward: the Ulysses group (:mod:`lvsa.ulysses`) and the ring group, and
the checks on their degrees. Data only: which collective groups a layer call runs in, found by the host
(diffusers' ``enable_parallelism``, another server's sequence parallelism) and carried by the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, GeometryError
from ..ulysses import UlyssesGroup


@dataclass(frozen=True)
class RingGroup:
    group: Any  # torch.distributed ProcessGroup
    degree: int
    rank: int  # rank inside the group: the index of this rank's video shard


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel layout of one forward: Ulysses and/or ring groups."""

    ulysses: UlyssesGroup | None
    ring: RingGroup | None

    @property
    def degree(self) -> int:
        """Sequence shards between layers: ``U x R``."""
        return (self.ulysses.degree if self.ulysses else 1) * (self.ring.degree if self.ring else 1)

    @property
    def shard_index(self) -> int:
        """This rank's sequence shard between layers (diffusers' flattened ``("ring", "ulysses")`` mesh)."""
        u = self.ulysses.degree if self.ulysses else 1
        return (self.ring.rank if self.ring else 0) * u + (self.ulysses.rank if self.ulysses else 0)

    def describe(self) -> str:
        return f"ulysses_degree={self.ulysses.degree if self.ulysses else 1} x " \
               f"ring_degree={self.ring.degree if self.ring else 1}"

    def check_tokens(self, tokens: int, latent_frames: int, patches_per_frame: int) -> None:
        if tokens % self.degree:
            raise GeometryError(
                f"{latent_frames} latent frames x {patches_per_frame} tokens = {tokens} video tokens do not split "
                f"into {self.degree} equal shards ({self.describe()}); change the frame count or the size, or "
                "the degrees"
            )


def check_degrees(world_size: int, ulysses_degree: int, ring_degree: int) -> None:
    """The degrees are integers >= 1 whose product is the launch's process count."""
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r}: must be an integer >= 1")
    if ulysses_degree * ring_degree != world_size:
        raise ConfigError(
            f"ulysses_degree={ulysses_degree} x ring_degree={ring_degree} = {ulysses_degree * ring_degree} "
            f"processes, but {world_size} were launched: launch torchrun --nproc-per-node "
            f"{ulysses_degree * ring_degree}, or choose degrees whose product is {world_size}")
