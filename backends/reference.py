"""The ground truth: dense float64 attention with the plan turned into an explicit token mask.

Slow and memory-hungry by design (an S x S mask and S x S scores); every other driver is tested against
it. Never chosen by ``backend=auto``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.plan import SparsePlan

if TYPE_CHECKING:
    from lvsa.attention import FrameReferences


def frame_mask(plan: SparsePlan) -> torch.Tensor:
    """``[T, T]`` bool, True where query frame (row) attends key frame (column)."""
    mask = torch.zeros(plan.latent_frames, plan.latent_frames, dtype=torch.bool)
    for f, row in plan.frame_rows():
        mask[f, list(row)] = True
    return mask


def token_mask(plan: SparsePlan) -> torch.Tensor:
    """``[S, S]`` bool over the whole sequence: text rows and columns are dense, video by frame blocks."""
    P, S, V = plan.patches_per_frame, plan.seq_len, plan.video_tokens
    video = frame_mask(plan).repeat_interleave(P, dim=0).repeat_interleave(P, dim=1)
    mask = torch.ones(S, S, dtype=torch.bool)
    vs = plan.video_start
    mask[vs : vs + V, vs : vs + V] = video
    return mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 sparse attention of ``[B, S, H, D]`` tensors; returns float64."""
    B, S, Hq, D = q.shape
    groups = Hq // k.shape[2]
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    if groups > 1:
        k64 = k64.repeat_interleave(groups, dim=2)
        v64 = v64.repeat_interleave(groups, dim=2)
    keep = (token_mask(plan) if mask is None else mask).to(q.device)[None, None]  # [1, 1, S, S]
    if key_padding_mask is not None:
        keys = torch.ones(B, S, dtype=torch.bool, device=q.device)
        ts = plan.text_start
        keys[:, ts : ts + plan.text_tokens] = key_padding_mask.to(device=q.device, dtype=torch.bool)
        keep = keep & keys[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * (scale if scale is not None else 1 / math.sqrt(D))
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v64)


def reference_with_frame_references(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan,
                                    references: FrameReferences) -> torch.Tensor:
    """Float64 attention of the video ``[B, S, H, D]`` over ``[video | reference]`` keys: the plan's frame mask
    over the video, and query frame ``first + i`` against reference frame ``i`` only (WanAnimate2's BlockMask,
    written out); returns float64."""
    P, T, R = plan.patches_per_frame, plan.latent_frames, references.frames
    frames = torch.zeros(T, T + R, dtype=torch.bool)
    frames[:, :T] = frame_mask(plan)
    for i in range(R):
        frames[references.first + i, T + i] = True
    tokens = references.key.shape[1] // R
    mask = torch.cat([frames[:, :T].repeat_interleave(P, 1), frames[:, T:].repeat_interleave(tokens, 1)], dim=1)
    keep = mask.repeat_interleave(P, 0).to(q.device)
    q64, k64, v64 = (t.to(torch.float64) for t in (q, torch.cat([k, references.key], 1),
                                                    torch.cat([v, references.value], 1)))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * q.shape[-1] ** -0.5
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v64)


def attention_with_lse_float64(q, k, v, key_mask=None, scale=None):
    """Float64 attention of q ``[B, S, Hq, D]`` against k/v ``[B, L, Hkv, D]`` and its log-sum-exp
    ``[B, Hq, S]``, both returned in float64; a sample that keeps no key gives lse -inf and zeros."""
    D = q.shape[-1]
    groups = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    if groups > 1:
        k64, v64 = k64.repeat_interleave(groups, dim=2), v64.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * (scale if scale is not None else 1 / math.sqrt(D))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :].to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", weights, v64), lse


@dataclass(frozen=True)
class ReferencePrepared(Prepared):
    token_mask: torch.Tensor  # [S, S] on the problem's device


class ReferenceDriver(Driver[ReferencePrepared]):
    name = "reference"
    priority = -100
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    auto_select = False

    def is_available(self, device_type: str) -> Availability:
        base = super().is_available(device_type)
        return Availability.yes("float64 dense ground truth (tests only)") if base else base

    def check_lse(self, problem: AttentionProblem) -> list[str]:
        return []

    def attend_with_lse(self, q, k, v, key_mask, scale):
        out, lse = attention_with_lse_float64(q, k, v, key_mask, scale)
        return out.to(q.dtype), lse

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> ReferencePrepared:
        return ReferencePrepared(plan, problem, token_mask(plan).to(problem.device))

    def run(self, prepared: ReferencePrepared, q, k, v, key_padding_mask=None):
        return reference_attention(
            q, k, v, prepared.plan, key_padding_mask, prepared.scale, prepared.token_mask
        ).to(q.dtype)
