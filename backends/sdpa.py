"""PyTorch ``scaled_dot_product_attention`` on any torch device.

Every query frame attends the same number of key frames, so all frames batch into one SDPA call: the
keys of each query frame (its globals, its window, and all text tokens) are gathered into a
``[frames, attended_tokens]`` batch with one index_select, in chunks that bound the gathered memory.
A dense plan (kfi=1) is one plain SDPA call over the whole sequence, so at the training horizon lvsa costs
what dense attention costs. Text queries are dense rows: one call against every key."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lvsa.driver import AttentionProblem, Availability, Driver
from lvsa.plan import SparsePlan


@dataclass(frozen=True)
class SdpaPrepared:
    plan: SparsePlan
    key_index: torch.Tensor | None  # [T, L*P + text] token positions per query frame; None when dense
    frames_per_chunk: int


class SdpaDriver(Driver):
    name = "sdpa"
    priority = 10
    devices = None
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

    #: upper bound on the gathered keys and values of one chunk of query frames
    gather_budget_bytes = 1 << 30

    def is_available(self, device_type: str) -> Availability:
        if not hasattr(F, "scaled_dot_product_attention"):
            return Availability.no(f"torch {torch.__version__} has no scaled_dot_product_attention")
        return Availability.yes("PyTorch scaled_dot_product_attention")

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> SdpaPrepared:
        if plan.is_dense:
            return SdpaPrepared(plan, None, plan.latent_frames)
        P, vs = plan.patches_per_frame, plan.video_start
        offsets = torch.arange(P)
        rows = []
        text = torch.arange(plan.text_start, plan.text_start + plan.text_tokens)
        for _, frames in plan.frame_rows():
            starts = torch.tensor(frames) * P + vs
            rows.append(torch.cat([(starts[:, None] + offsets).reshape(-1), text]))
        key_index = torch.stack(rows).to(problem.device)
        item = torch.empty((), dtype=problem.dtype).element_size()
        per_frame = 2 * problem.batch * key_index.shape[1] * problem.kv_heads * problem.head_dim * item
        frames_per_chunk = max(1, min(plan.latent_frames, self.gather_budget_bytes // max(per_frame, 1)))
        return SdpaPrepared(plan, key_index, frames_per_chunk)

    def run(self, prepared, q, k, v, key_padding_mask=None, scale=None):
        plan = prepared.plan
        B, S, Hq, D = q.shape
        gqa = Hq != k.shape[2]
        key_mask = None
        if key_padding_mask is not None:
            key_mask = torch.ones(B, S, dtype=torch.bool, device=q.device)
            key_mask[:, plan.text_start : plan.text_start + plan.text_tokens] = key_padding_mask.bool()
        if prepared.key_index is None:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            return _sdpa(q, k, v, mask, scale, gqa)

        out = torch.empty_like(q)
        T, P, vs, V = plan.latent_frames, plan.patches_per_frame, plan.video_start, plan.video_tokens
        if plan.text_tokens:
            # text queries are dense rows: they attend every key
            ts, nt = plan.text_start, plan.text_tokens
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out[:, ts : ts + nt] = _sdpa(q[:, ts : ts + nt], k, v, mask, scale, gqa)
        video_q = q[:, vs : vs + V].unflatten(1, (T, P))  # [B, T, P, Hq, D]
        Lk = prepared.key_index.shape[1]
        for f0 in range(0, T, prepared.frames_per_chunk):
            f1 = min(T, f0 + prepared.frames_per_chunk)
            n = f1 - f0
            index = prepared.key_index[f0:f1].reshape(-1)
            kc = k.index_select(1, index).view(B * n, Lk, -1, D)
            vc = v.index_select(1, index).view(B * n, Lk, -1, D)
            qc = video_q[:, f0:f1].reshape(B * n, P, Hq, D)
            mask = None
            if key_mask is not None:
                mask = key_mask.index_select(1, index).view(B * n, 1, 1, Lk)
            chunk = _sdpa(qc, kc, vc, mask, scale, gqa)  # [B*n, P, Hq, D]
            out[:, vs + f0 * P : vs + f1 * P] = chunk.reshape(B, n * P, Hq, D)
        return out


def _sdpa(q, k, v, mask, scale, gqa):
    """SDPA on ``[B, S, H, D]`` tensors (torch wants heads before sequence)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return out.transpose(1, 2)
