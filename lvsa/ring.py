"""Ring attention (and Ulysses x ring) for lvsa inside diffusers' context parallelism: the groups, the
exchange, and the ring steps of one layer call.

diffusers cuts the sequence over ``U x R`` ranks (mesh ``("ring", "ulysses")``, rank ``r * U + u``). The
Ulysses all-to-all (:mod:`lvsa.ulysses`) gives each rank the ``r``-th of ``R`` contiguous video shards for
``heads / U`` heads; the ``R`` ranks of a ring group hold the ``R`` shards of the same heads. Each rank
gathers the group's key/value shards (one all-gather, as diffusers' ring attention does) and runs its query
shard against each key shard: one ring step each, exactly the attended (query frame, key frame) pairs of
that pair of shards (:class:`lvsa.shards.RingStep`), merged through log-sum-exp. **A step whose shards share
no attended frame pair is skipped**: with the default pattern, distant shards meet only at the global frames'
tokens, and a shard without a global frame is not computed at all.

Text tokens (HunyuanVideo 1.5, CogVideoX) are held whole by every rank, as under Ulysses alone. Video
queries attend them in the local step (with the padding mask); the text queries attend this rank's video
shard (and, on ring rank 0 only, the text keys), and the group merges those disjoint partials so every rank
ends with the whole text output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .dispatch import log_plan_once, select_driver
from .driver import AttentionProblem
from .errors import ConfigError, GeometryError
from .shards import RingStep, skipped_key_shards
from .ulysses import QKV, UlyssesGroup

if TYPE_CHECKING:
    import torch

    from .plan import SparsePlan
    from .settings import LVSASettings


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


def gather_shards(x: torch.Tensor, ring: RingGroup) -> list[torch.Tensor]:
    """Every ring rank's shard of ``x`` (``[B, L, H, D]``), in shard order."""
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(ring.degree)]
    dist.all_gather(parts, x.contiguous(), group=ring.group)
    return parts


def merge_over_ring(out: torch.Tensor, lse: torch.Tensor, ring: RingGroup) -> torch.Tensor:
    """The attention over the union of the ring ranks' disjoint key sets, from each rank's partial
    ``out [B, S, H, D]`` and ``lse [B, H, S]``: every rank gets the merged output."""
    import torch
    import torch.distributed as dist

    from .backends.attention_ops import merge

    outs = [torch.empty_like(out) for _ in range(ring.degree)]
    lses = [torch.empty_like(lse) for _ in range(ring.degree)]
    dist.all_gather(outs, out.contiguous(), group=ring.group)
    dist.all_gather(lses, lse.contiguous(), group=ring.group)
    merged = torch.empty_like(out)
    merge(list(zip(outs, lses, strict=True)), merged)
    return merged


@dataclass(frozen=True)
class RingResult:
    video: torch.Tensor
    text: torch.Tensor | None
    steps: int  # ring steps of this call
    skipped: tuple[int, ...]  # the key shards whose step was skipped (no attended frame pair)
    driver: str


def ring_attention(
    video: QKV,
    text: QKV | None,
    plan: SparsePlan,
    key_padding_mask: torch.Tensor | None,
    ring: RingGroup,
    settings: LVSASettings,
    *,
    key_value_shards: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    merge_text: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stepwise: bool = False,
) -> RingResult:
    """One layer call under ring attention: this rank's video shard (``[B, V / R, H, D]``) and the whole
    text attend under ``plan`` (of the whole sequence). ``key_value_shards`` (every rank's k and v shards)
    and ``merge_text`` replace the two collectives: tests simulate the ring in one process with them.

    The key/value shards are all-gathered, so by default every ring step of this rank runs in one set of
    calls over the attended shards end to end (as large as on one device); ``stepwise=True`` runs one set per
    step, each merged through its log-sum-exp, as a ring pass that holds one shard at a time would. Both
    compute exactly the attended pairs and skip the same steps."""
    from .backends import ring_step

    q, k, v = video
    problem = AttentionProblem.for_ring(q, k, v, plan, ring.degree, key_padding_mask)
    driver = select_driver(problem, settings.backend.lower(), settings.fallback, lse=True)
    log_plan_once(plan)
    budget = getattr(driver, "gather_budget_bytes", ring_step.GATHER_BUDGET_BYTES)
    max_batch = getattr(driver, "max_batch", None)
    attend, scale = driver.attend_with_lse, problem.scale

    keys, values = key_value_shards or (gather_shards(k, ring), gather_shards(v, ring))
    acc = ring_step.LseAccumulator(q)
    skipped = skipped_key_shards(plan, ring.degree, ring.rank)
    if stepwise:
        for s in range(ring.degree):
            j = (ring.rank - s) % ring.degree  # the local shard first, as in a ring pass
            if j not in skipped:
                index = ring_step.index_for(RingStep(plan, ring.degree, ring.rank, j), problem, budget, max_batch)
                ring_step.run_step(index, q, keys[j], values[j], scale, attend, acc)
    else:
        # the attended shards end to end (a skipped shard is never read): one index for every step
        index = ring_step.index_for_shards(plan, ring.degree, ring.rank, problem, budget, max_batch)
        ring_step.run_step(index, q, _end_to_end(keys), _end_to_end(values), scale, attend, acc)
    text_out = None
    if text is not None:
        tq, tk, tv = text
        acc.add(*attend(q, tk, tv, key_padding_mask, scale))  # every video query attends the text keys
        text_acc = ring_step.LseAccumulator(tq)
        text_acc.add(*attend(tq, k, v, None, scale))  # this rank's video shard
        if ring.rank == 0:  # the text keys once in the group, so the merge counts them once
            text_acc.add(*attend(tq, tk, tv, key_padding_mask, scale))
        merged = (merge_text or (lambda o, lse: merge_over_ring(o, lse, ring)))(text_acc.out, text_acc.lse)
        text_out = merged.to(tq.dtype)
    return RingResult(acc.out.to(q.dtype), text_out, ring.degree, skipped, driver.name)


def _end_to_end(shards: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(shards, dim=1)


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
