"""Ring attention (and Ulysses x ring): the exchange and the ring steps of one layer call (the groups are
:mod:`.layout`'s).

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
from typing import TYPE_CHECKING

from ..driver import AttentionProblem, Driver, Prepared
from ..kernels import ring_step
from ..kernels.attention_ops import merge
from ..shards import RingStep, skipped_key_shards
from ..ulysses import QKV
from .drivers import DriverRequest, cached_state, select_driver
from .layout import RingGroup

if TYPE_CHECKING:
    import torch

    from ..plan import SparsePlan


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


@dataclass(frozen=True)
class RingPrepared(Prepared):
    """A query shard's ring steps under one plan: which key shards it skips, and the index tensors of the
    others (every step end to end, or one per step), kept in the drivers' one prepared-state cache."""

    shards: int
    query_shard: int
    skipped: tuple[int, ...]
    end_to_end: ring_step.RingStepIndex | None
    per_step: tuple[ring_step.RingStepIndex | None, ...] | None


def prepare_ring(driver: Driver, plan: SparsePlan, problem: AttentionProblem, shards: int, query_shard: int,
                 stepwise: bool) -> RingPrepared:
    """The ring steps' indices for ``driver`` (its declared gather budget and batch limit), built once per
    plan and problem."""

    def build() -> RingPrepared:
        budget, max_batch = driver.gather_budget_bytes, driver.max_batch
        skipped = skipped_key_shards(plan, shards, query_shard)
        if stepwise:
            per_step = tuple(None if j in skipped else ring_step.index_for(
                RingStep(plan, shards, query_shard, j), problem, budget, max_batch) for j in range(shards))
            return RingPrepared(plan, problem, shards, query_shard, skipped, None, per_step)
        end_to_end = ring_step.index_for_shards(plan, shards, query_shard, problem, budget, max_batch)
        return RingPrepared(plan, problem, shards, query_shard, skipped, end_to_end, None)

    return cached_state(driver, plan, problem, ("ring", shards, query_shard, stepwise), build)


def ring_attention(
    video: QKV,
    text: QKV | None,
    plan: SparsePlan,
    key_padding_mask: torch.Tensor | None,
    ring: RingGroup,
    request: DriverRequest,
    *,
    key_value_shards: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    merge_text: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stepwise: bool = False,
    more_keys: Callable[[ring_step.LseAccumulator, ring_step.Attend, float], None] | None = None,
) -> RingResult:
    """One layer call under ring attention: this rank's video shard (``[B, V / R, H, D]``) and the whole
    text attend under ``plan`` (of the whole sequence), through the driver ``request`` picks (settings, or a
    :class:`~.drivers.DriverChoice`). ``key_value_shards`` (every rank's k and v shards) and ``merge_text``
    replace the two collectives: tests simulate the ring in one process with them.

    The key/value shards are all-gathered, so by default every ring step of this rank runs in one set of
    calls over the attended shards end to end (as large as on one device); ``stepwise=True`` runs one set per
    step, each merged through its log-sum-exp, as a ring pass that holds one shard at a time would. Both
    compute exactly the attended pairs and skip the same steps. ``more_keys`` merges the video queries'
    attention over keys outside the video (a shard's frame references) into their result."""
    q, k, v = video
    problem = AttentionProblem.for_ring(q, k, v, plan, ring.degree, key_padding_mask)
    driver = select_driver(problem, request.backend.lower(), request.fallback, lse=True)
    prepared = prepare_ring(driver, plan, problem, ring.degree, ring.rank, stepwise)
    attend, scale = driver.attend_with_lse, problem.scale

    keys, values = key_value_shards or (gather_shards(k, ring), gather_shards(v, ring))
    acc = ring_step.LseAccumulator(q)
    if prepared.per_step is not None:
        for s in range(ring.degree):
            j = (ring.rank - s) % ring.degree  # the local shard first, as in a ring pass
            index = prepared.per_step[j]
            if index is not None:
                ring_step.run_step(index, q, keys[j], values[j], scale, attend, acc)
    else:
        # the attended shards end to end (a skipped shard is never read): one index for every step
        ring_step.run_step(prepared.end_to_end, q, _end_to_end(keys), _end_to_end(values), scale, attend, acc)
    if more_keys is not None:
        more_keys(acc, attend, scale)
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
    return RingResult(acc.out.to(q.dtype), text_out, ring.degree, prepared.skipped, driver.name)


def _end_to_end(shards: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(shards, dim=1)
