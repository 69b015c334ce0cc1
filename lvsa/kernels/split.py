"""The split shape of a plan, for drivers built on dense fused-attention kernels that return log-sum-exp.

Every video query attends the same global frames and text tokens, so that part is one large call over all
queries; each frame's window (its non-global frames, the same count for every frame) is gathered into a
``[frames, window tokens]`` batch and attended in one batched call per chunk of frames; the partial results
are merged through their log-sum-exp (:func:`attention_ops.merge`). The kernel is a parameter, so the sdpa
driver (torch kernels) and the npu driver (torch_npu) share this code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lvsa.driver import AttentionProblem
from lvsa.plan import SparsePlan

from . import attention_ops

#: ``attend(q, k, v, key_mask, scale) -> (out [B, S, Hq, D], lse [B, Hq, S])``: q ``[B, S, Hq, D]``, k/v
#: ``[B, L, Hkv, D]`` (GQA allowed), key_mask ``[B, L]`` bool (True = keep) or None. A sample that keeps no
#: key must come back with lse -inf and a zero output (:func:`attention_ops.without_empty_samples`).
Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float | None],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass(frozen=True)
class SplitIndex:
    global_keys: torch.Tensor  # token positions of the global frames
    text_keys: torch.Tensor | None  # token positions of the text, if any
    window_keys: torch.Tensor  # [T, window tokens]: each query frame's non-global window frames
    frames_per_chunk: int


def frame_tokens(plan: SparsePlan, frames: torch.Tensor) -> torch.Tensor:
    """Token positions of latent frames: ``[..., n]`` frames -> ``[..., n * P]`` positions."""
    P = plan.patches_per_frame
    tokens = frames[..., None] * P + plan.video_start + torch.arange(P)
    return tokens.reshape(*frames.shape[:-1], -1)


def attended_frames(plan: SparsePlan) -> torch.Tensor:
    """The plan's CSR as a ``[T, L]`` table (every query frame attends the same number of frames)."""
    return torch.tensor(plan.indices, dtype=torch.long).view(plan.latent_frames, plan.attended_per_frame)


def build_index(plan: SparsePlan, problem: AttentionProblem, budget_bytes: int, expanded_heads: bool) -> SplitIndex:
    """Index tensors on the problem's device; chunks bounded by ``budget_bytes`` of gathered keys and values
    (with query heads when the kernel needs GQA expanded) plus float32 merge temporaries."""
    T, P = plan.latent_frames, plan.patches_per_frame
    frames = attended_frames(plan)
    is_global = torch.zeros(T, dtype=torch.bool)
    is_global[list(plan.globals)] = True
    window = frames[~is_global[frames]].view(T, -1)
    device = problem.device
    text = attention_ops.text_keys(plan, device)
    item = torch.empty((), dtype=problem.dtype).element_size()
    heads = problem.q_heads if expanded_heads else problem.kv_heads
    per_frame = 2 * problem.batch * window.shape[1] * P * heads * problem.head_dim * item
    per_frame += 3 * problem.batch * P * problem.q_heads * problem.head_dim * 4
    return SplitIndex(
        global_keys=frame_tokens(plan, torch.tensor(plan.globals)[None])[0].to(device),
        text_keys=text,
        window_keys=frame_tokens(plan, window).to(device),
        frames_per_chunk=max(1, min(T, budget_bytes // max(per_frame, 1))),
    )


def gathered_chunks(plan: SparsePlan, frame_keys: torch.Tensor, frames_per_chunk: int, q, k, v):
    """Chunks of query frames with their gathered keys: yields ``(f0, f1, index, qc, kc, vc)`` where
    ``index`` holds the chunk's key positions, ``qc`` is ``[B*n, P, Hq, D]`` (one batch entry per frame)
    and ``kc``/``vc`` are ``[B*n, keys per frame, Hkv, D]``."""
    B, _, Hq, D = q.shape
    T, P, vs, V = plan.latent_frames, plan.patches_per_frame, plan.video_start, plan.video_tokens
    frames_q = q[:, vs : vs + V].unflatten(1, (T, P))  # [B, T, P, Hq, D]
    per_frame = frame_keys.shape[1]
    for f0 in range(0, T, frames_per_chunk):
        f1 = min(T, f0 + frames_per_chunk)
        n = f1 - f0
        index = frame_keys[f0:f1].reshape(-1)
        kc = k.index_select(1, index).view(B * n, per_frame, -1, D)
        vc = v.index_select(1, index).view(B * n, per_frame, -1, D)
        yield f0, f1, index, frames_q[:, f0:f1].reshape(B * n, P, Hq, D), kc, vc
        del kc, vc  # one chunk's gather alive at a time (callers drop theirs before the next)


def run_video_queries(
    index: SplitIndex,
    plan: SparsePlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float | None,
    out: torch.Tensor,
    attend: Attend,
) -> None:
    """Write the video queries' rows of ``out``. ``key_mask`` is ``[B, S]`` (True = keep) or None."""
    B, _, Hq, D = q.shape
    P, vs, V = plan.patches_per_frame, plan.video_start, plan.video_tokens
    video_q = q[:, vs : vs + V]
    shared = [attend(video_q, k.index_select(1, index.global_keys), v.index_select(1, index.global_keys), None, scale)]
    if index.text_keys is not None:
        text_mask = None if key_mask is None else key_mask.index_select(1, index.text_keys)
        text_k, text_v = k.index_select(1, index.text_keys), v.index_select(1, index.text_keys)
        shared.append(attend(video_q, text_k, text_v, text_mask, scale))
    chunks = gathered_chunks(plan, index.window_keys, index.frames_per_chunk, q, k, v)
    for f0, f1, _, qc, kc, vc in chunks:
        n = f1 - f0
        o_band, lse_band = attend(qc, kc, vc, None, scale)
        rows = slice(f0 * P, f1 * P)
        lse_band = lse_band.reshape(B, n, Hq, P).transpose(1, 2).reshape(B, Hq, n * P)
        parts = [(o[:, rows], lse[:, :, rows]) for o, lse in shared]
        parts.append((o_band.reshape(B, n * P, Hq, D), lse_band))
        del qc, kc, vc, o_band
        attention_ops.merge(parts, out[:, vs + f0 * P : vs + f1 * P])
