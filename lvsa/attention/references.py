"""Video attention with frame-paired reference keys: every query frame of the plan's grid attends, besides the
video keys its plan gives it, the keys of one reference frame of its own (WanAnimate2's in-context reference:
generation frame ``f`` also sees frame ``f - 1`` of the driving video's cached keys and values).

The two key sets are disjoint, so the call is two partial attentions merged through their log-sum-exp: the
plan's video part through the ring steps' index of a single shard (:mod:`lvsa.kernels.ring_step`, prepared
once per plan in the drivers' one cache), and the reference part as one batched call of ``[frames, reference
tokens]``. Both go through the chosen driver's attention with log-sum-exp (:meth:`lvsa.Driver.attend_with_lse`),
so a driver without it is refused here as under ring attention, with its reason. Under context parallelism
the executor hands :func:`add_references` to the ring steps, with this rank's heads and query frames of the
references (:meth:`FrameReferences.with_tensors`, :meth:`FrameReferences.for_query_frames`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..driver import AttentionProblem
from ..errors import GeometryError
from ..kernels import ring_step
from ..kernels.attention_ops import attend_with_lse
from ..kernels.split import Attend
from .drivers import DriverRequest, select_driver
from .ring import prepare_ring

if TYPE_CHECKING:
    from ..plan import SparsePlan
    from ..ulysses import QKV


@dataclass(frozen=True)
class FrameReferences:
    """Keys and values ``[B, frames * tokens, H, D]`` of ``frames`` reference frames: query frame
    ``first + i`` attends reference frame ``i``; the query frames without one attend the video only."""

    key: torch.Tensor
    value: torch.Tensor
    frames: int
    first: int = 0

    def check(self, batch: int, latent_frames: int) -> None:
        if self.key.shape != self.value.shape or self.key.dim() != 4 or self.key.shape[0] != batch:
            raise GeometryError(f"reference keys {tuple(self.key.shape)} and values {tuple(self.value.shape)} must "
                                f"both be [{batch}, frames * tokens, heads, head_dim]")
        if self.frames < 1 or self.key.shape[1] % self.frames:
            raise GeometryError(f"{self.key.shape[1]} reference tokens are not {self.frames} whole frames")
        if self.first < 0 or self.first + self.frames > latent_frames:
            raise GeometryError(f"reference frames {self.first}..{self.first + self.frames - 1} of the query frames "
                                f"do not fit the grid's {latent_frames} frames")

    def for_query_frames(self, start: int, count: int) -> FrameReferences | None:
        """The references of query frames ``start .. start + count - 1`` (a ring shard's), numbered from that
        window's first frame; ``None`` when none of them has one."""
        low, high = max(start, self.first), min(start + count, self.first + self.frames)
        if low >= high:
            return None
        tokens = self.key.shape[1] // self.frames
        rows = slice((low - self.first) * tokens, (high - self.first) * tokens)
        return FrameReferences(self.key[:, rows], self.value[:, rows], high - low, low - start)

    def with_tensors(self, take: Callable[[torch.Tensor], torch.Tensor]) -> FrameReferences:
        """The same references with ``take`` applied to the keys and the values (this rank's heads)."""
        return replace(self, key=take(self.key), value=take(self.value))


def attend_with_references(video: QKV, plan: SparsePlan | None, references: FrameReferences,
                           request: DriverRequest) -> torch.Tensor:
    """The video output ``[B, S, H, D]`` of queries attending the video keys under ``plan`` (every video key
    when ``None``, a call the policy let fall back) and their frames' reference keys."""
    q, k, v = video
    D = q.shape[-1]
    frames = plan.latent_frames if plan is not None else references.first + references.frames
    accumulated = ring_step.LseAccumulator(q)
    if plan is None:
        attend, scale = attend_with_lse, D ** -0.5
        accumulated.add(*attend(q, k, v, None, scale))
    else:
        problem = AttentionProblem.for_ring(q, k, v, plan, 1)
        driver = select_driver(problem, request.backend.lower(), request.fallback, lse=True)
        attend, scale = driver.attend_with_lse, problem.scale
        prepared = prepare_ring(driver, plan, problem, 1, 0, stepwise=False)
        ring_step.run_step(prepared.end_to_end, q, k, v, scale, attend, accumulated)
    add_references(accumulated, q, references, frames, attend, scale)
    return accumulated.out.to(q.dtype)


def add_references(accumulated: ring_step.LseAccumulator, q: torch.Tensor, references: FrameReferences,
                   frames: int, attend: Attend, scale: float) -> None:
    """Merge into ``accumulated`` the attention of the queries ``q`` (``frames`` whole frames) over their
    frames' reference keys: one batched call of ``[frames, reference tokens]``."""
    B, S, H, D = q.shape
    if S % frames:
        raise GeometryError(f"{S} video tokens are not {frames} whole frames")
    references.check(B, frames)
    P = S // frames
    R, first = references.frames, references.first
    rows = torch.arange(first * P, (first + R) * P, device=q.device)
    tokens = references.key.shape[1] // R
    queries = q[:, first * P : (first + R) * P].reshape(B * R, P, H, D)
    keys = references.key.reshape(B * R, tokens, *references.key.shape[2:])
    values = references.value.reshape(B * R, tokens, *references.value.shape[2:])
    out, lse = attend(queries, keys, values, None, scale)  # [B * R, P, H, D], [B * R, H, P]
    lse = lse.reshape(B, R, H, P).transpose(1, 2).reshape(B, H, R * P)
    accumulated.add(out.reshape(B, R * P, H, D), lse, rows)
