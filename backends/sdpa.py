"""PyTorch ``scaled_dot_product_attention`` on any torch device, in one of three shapes:

- ``dense``: a plan that covers every frame (kfi=1) is one plain SDPA call, so at the training horizon
  lvsa costs what dense attention costs.
- ``split`` (where torch has a fused kernel returning log-sum-exp: CUDA, CPU): every video query attends
  the same global frames and text tokens, so that part is one large call over all queries; each frame's
  window (its non-global frames) is gathered into a ``[frames, window tokens]`` batch and attended in one
  batched call; the two partial results are merged through their log-sum-exp.
- ``gather`` (any device): each query frame's whole key set (globals, window, text) is gathered into a
  ``[frames, attended tokens]`` batch: every frame attends the same number of frames, so one batched call.

Gathers are chunked over query frames to bound their memory. Text queries are dense rows: one call
against every key. The strategy is chosen at prepare time (``strategy="auto"``: split where possible)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.kernels import split
from lvsa.kernels.attention_ops import (
    attend_with_lse,
    dense_attention,
    lse_kernel_reason,
    sdpa,
    sequence_key_mask,
    text_keys,
)
from lvsa.plan import SparsePlan

Strategy = Literal["auto", "split", "gather"]


@dataclass(frozen=True)
class SdpaPrepared(Prepared):
    strategy: Literal["dense", "split", "gather"]
    #: gather: [T, attended tokens + text] key positions per query frame
    frame_keys: torch.Tensor | None = None
    frames_per_chunk: int = 1
    split: split.SplitIndex | None = None


class SdpaDriver(Driver[SdpaPrepared]):
    name = "sdpa"
    priority = 10
    devices = None
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

    def __init__(self, strategy: Strategy = "auto") -> None:
        if strategy not in ("auto", "split", "gather"):
            raise ValueError(f"strategy={strategy!r}: choose auto, split or gather")
        self.strategy = strategy

    def is_available(self, device_type: str) -> Availability:
        if not hasattr(F, "scaled_dot_product_attention"):
            return Availability.no(f"torch {torch.__version__} has no scaled_dot_product_attention")
        return Availability.yes("PyTorch scaled_dot_product_attention")

    def check(self, problem: AttentionProblem) -> list[str]:
        reasons = super().check(problem)
        if self.strategy == "split":
            why = lse_kernel_reason(problem.device_type, problem.dtype, problem.head_dim)
            if why:
                reasons.append(why)
        return reasons

    def check_lse(self, problem: AttentionProblem) -> list[str]:
        why = lse_kernel_reason(problem.device_type, problem.dtype, problem.head_dim)
        return [why] if why else []

    def attend_with_lse(self, q, k, v, key_mask, scale):
        return attend_with_lse(q, k, v, key_mask, scale)

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> SdpaPrepared:
        if plan.is_dense:
            return SdpaPrepared(plan, problem, "dense")
        strategy = self.strategy
        if strategy == "auto":
            why = lse_kernel_reason(problem.device_type, problem.dtype, problem.head_dim)
            strategy = "gather" if why else "split"
        if strategy == "split":
            index = split.build_index(plan, problem, self.gather_budget_bytes, expanded_heads=True)
            return SdpaPrepared(plan, problem, "split", split=index)
        keys = split.frame_tokens(plan, split.attended_frames(plan))
        if plan.text_tokens:
            keys = torch.cat([keys, text_keys(plan, "cpu").expand(plan.latent_frames, -1)], dim=1)
        item = torch.empty((), dtype=problem.dtype).element_size()
        per_frame = 2 * problem.batch * keys.shape[1] * problem.kv_heads * problem.head_dim * item
        frames_per_chunk = max(1, min(plan.latent_frames, self.gather_budget_bytes // max(per_frame, 1)))
        return SdpaPrepared(plan, problem, "gather", keys.to(problem.device), frames_per_chunk)

    def run(self, prepared: SdpaPrepared, q, k, v, key_padding_mask=None):
        plan, scale = prepared.plan, prepared.scale
        B, _, Hq, _ = q.shape
        gqa = Hq != k.shape[2]
        key_mask = sequence_key_mask(plan, key_padding_mask, B, q.device)
        if prepared.strategy == "dense":
            return dense_attention(q, k, v, key_mask, scale)

        out = torch.empty_like(q)
        if plan.text_tokens:
            # text queries are dense rows: they attend every key
            ts, nt = plan.text_start, plan.text_tokens
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out[:, ts : ts + nt] = sdpa(q[:, ts : ts + nt], k, v, mask, scale, gqa)
        if prepared.strategy == "split":
            split.run_video_queries(prepared.split, plan, q, k, v, key_mask, scale, out, attend_with_lse)
        else:
            _run_gather(prepared, q, k, v, key_mask, gqa, out)
        return out


def _run_gather(prepared: SdpaPrepared, q, k, v, key_mask, gqa, out):
    plan = prepared.plan
    B, _, Hq, D = q.shape
    P, vs = plan.patches_per_frame, plan.video_start
    chunks = split.gathered_chunks(plan, prepared.frame_keys, prepared.frames_per_chunk, q, k, v)
    for f0, f1, index, qc, kc, vc in chunks:
        mask = None
        if key_mask is not None:
            mask = key_mask.index_select(1, index).view(qc.shape[0], 1, 1, -1)
        chunk = sdpa(qc, kc, vc, mask, prepared.scale, gqa)  # [B*n, P, Hq, D]
        del qc, kc, vc
        out[:, vs + f0 * P : vs + f1 * P] = chunk.reshape(B, (f1 - f0) * P, Hq, D)
