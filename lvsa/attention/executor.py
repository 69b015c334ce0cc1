"""The one place a layer call is executed, whoever hosts the model: :func:`execute`.

It takes the host's :class:`~.context.AttentionContext` and the layer's video (and text) queries, keys and
values ``[B, S, H, D]``, and does, in order: the Ulysses exchange in (the video's sequence shards become the
whole sequence for this rank's heads, the text is cut to the same heads), the plan (unless the host planned
already), ring attention or one call of the joined sequence through the chosen driver (dense attention over
the same tensors for a call the policy let fall back), and the Ulysses exchange out. A video that also
attends frame-paired reference keys (:class:`~.references.FrameReferences`, without text) takes them whole on
every rank: each rank attends its heads of them under Ulysses, and its query frames' under ring attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import GeometryError
from ..kernels.attention_ops import dense_attention, key_mask_with_text
from ..ulysses import QKV, local_heads, to_heads, to_sequence
from .drivers import run_plan
from .references import FrameReferences, add_references, attend_with_references
from .ring import ring_attention

if TYPE_CHECKING:
    from ..kernels.ring_step import LseAccumulator
    from ..kernels.split import Attend
    from ..plan import SparsePlan
    from .context import AttentionContext
    from .layout import RingGroup


class _PlanInCall:
    def __repr__(self) -> str:
        return "PLAN_IN_CALL"


#: ``execute(..., plan=PLAN_IN_CALL)``: the executor plans the call itself (a compiled graph's layer calls)
PLAN_IN_CALL = _PlanInCall()


def execute(
    context: AttentionContext,
    origin: str,
    video: QKV,
    text: QKV | None = None,
    key_padding_mask: torch.Tensor | None = None,
    plan: SparsePlan | _PlanInCall | None = PLAN_IN_CALL,
    references: FrameReferences | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The video (and text) outputs ``[B, S, H, D]`` of one layer call named ``origin``. ``plan`` is the
    host's plan of this call (:meth:`AttentionContext.plan`), ``None`` for dense attention after a fallback,
    or :data:`PLAN_IN_CALL` to plan here, falling back to dense attention as the policy allows.
    ``references``: keys each video frame attends besides the video (no text; whole on every rank)."""
    if isinstance(plan, _PlanInCall):
        text_tokens = 0 if text is None else text[0].shape[1]
        seq_len = context.video_tokens(video[0].shape[1]) + text_tokens
        plan = context.plan(origin, seq_len, text_tokens)
    parallel = context.parallel
    if references is not None and text is not None:
        raise GeometryError(f"{origin}: frame-paired reference keys run without text tokens")
    ulysses = parallel.ulysses if parallel else None
    if ulysses is not None:
        ulysses.check_heads(video[0].shape[2], context.model)
        video, text = to_heads(video, text, ulysses)
        if references is not None:
            references = references.with_tensors(lambda t: local_heads(t, ulysses))
    ring = parallel.ring if parallel else None
    if ring is not None:
        if plan is None:  # the policy is strict under context parallelism: no plan never reaches here
            raise GeometryError("ring attention needs a plan")
        more_keys = None if references is None else _shard_references(origin, video[0], plan, references, ring)
        result = ring_attention(video, text, plan, key_padding_mask, ring, context.driver, more_keys=more_keys)
        stats = context.stats
        stats.ring_steps += result.steps
        stats.ring_steps_skipped += len(result.skipped)
        stats.last_skipped_key_shards = result.skipped
        video_out, text_out = result.video, result.text
    elif references is not None:
        video_out, text_out = attend_with_references(video, plan, references, context.driver), None
    else:
        video_out, text_out = _joined(context, video, text, plan, key_padding_mask)
    if ulysses is not None:
        video_out, text_out = to_sequence(video_out, text_out, ulysses)
    return video_out, text_out


def _joined(context: AttentionContext, video: QKV, text: QKV | None, plan: SparsePlan | None,
            key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The video and text as one sequence (the text where the model puts it), in one call."""
    after = (plan.text_position if plan is not None else context.text_position) == "after"
    video_len = video[0].shape[1]
    if text is None:
        q, k, v = video
    else:
        first, second = (video, text) if after else (text, video)
        q, k, v = (torch.cat([a, b], dim=1) for a, b in zip(first, second, strict=True))
    if plan is not None:
        out = run_plan(q, k, v, plan, context.driver, key_padding_mask)
    else:
        key_mask = key_mask_with_text(key_padding_mask, q.shape[1], video_len if after else 0, q.shape[0], q.device)
        out = dense_attention(q, k, v, key_mask)
    if text is None:
        return out, None
    if after:
        return out[:, :video_len], out[:, video_len:]
    return out[:, -video_len:], out[:, :-video_len]


def _shard_references(origin: str, query: torch.Tensor, plan: SparsePlan, references: FrameReferences,
                      ring: RingGroup) -> Callable[[LseAccumulator, Attend, float], None] | None:
    """The reference part of a ring rank's query shard (whole frames ``rank * F / R`` on), to merge into its
    ring steps' result; ``None`` when none of its frames has a reference."""
    frames, degree = plan.latent_frames, ring.degree
    if frames % degree:
        raise GeometryError(f"{origin}: frame-paired reference keys need ring shards of whole frames, and "
                            f"{frames} latent frames do not split into {degree}")
    shard_frames = frames // degree
    mine = references.for_query_frames(ring.rank * shard_frames, shard_frames)
    if mine is None:
        return None
    return lambda accumulated, attend, scale: add_references(accumulated, query, mine, shard_frames, attend, scale)
