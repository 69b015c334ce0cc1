"""Ascend NPU driver: the plan through ``torch_npu.npu_fused_infer_attention_score`` (FIA).

Why FIA rather than ``npu_fusion_attention``: the plan is run as the split of ``backends/split.py`` (all
video queries against the global frames, each frame against its window, merged by log-sum-exp), which
needs each partial result's log-sum-exp. FIA returns it directly (``softmax_lse_flag``, natural log,
``(B, N, S, 1)``), takes GQA as ``num_key_value_heads``, and is the inference op (graph mode supported);
``npu_fusion_attention`` is the training op and returns the softmax max and sum in 8-wide blocks instead.
Neither op takes a block-sparse mask, and a token mask at video lengths (S x S) would not fit.

The op's traps, handled here: layout BSND is diffusers' ``[batch, seq, heads, head_dim]`` as is; inputs
must be contiguous; ``scale`` defaults to 1.0, so 1/sqrt(head_dim) is always passed; ``atten_mask``
marks what is **excluded** (True = not computed), the opposite of lvsa's key_padding_mask (True = keep),
so the padding mask is inverted once, in :func:`excluded_keys`; a fully excluded row would be garbage, so
masked calls ask for the op's invalid-row correction (``inner_precise=2``).

Not verified on Ascend hardware: tested against a CPU emulation of the op's documented semantics
(``tests/fakes/torch_npu.py``); ``tox -e npu`` runs the same parity matrix on a real host."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from lvsa.driver import AttentionProblem, Availability, Driver
from lvsa.plan import SparsePlan

from . import partial, split

INSTALL_HINT = "pip install 'lvsa[npu]' on a host with the CANN toolkit, then source its set_env.sh"


@dataclass(frozen=True)
class NpuPrepared:
    plan: SparsePlan
    split: split.SplitIndex | None  # None: the plan is dense
    video_keys: torch.Tensor | None  # positions of all video tokens (dense rows with padded text)
    text_keys: torch.Tensor | None


def excluded_keys(key_mask: torch.Tensor, queries: int) -> torch.Tensor:
    """lvsa's ``[B, L]`` keep-mask as FIA's ``atten_mask``: ``(B, 1, Q_S, KV_S)`` bool, True = excluded."""
    B, L = key_mask.shape
    return (~key_mask.bool())[:, None, None, :].expand(B, 1, queries, L).contiguous()


def fused_attention(q, k, v, key_mask=None, scale=None):
    """FIA over ``[B, S, H, D]`` tensors (GQA allowed): ``(out [B, S, Hq, D], lse [B, Hq, S])``."""
    import torch_npu

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    Hq, D = q.shape[2], q.shape[3]
    out, lse = torch_npu.npu_fused_infer_attention_score(
        q, k, v,
        atten_mask=None if key_mask is None else excluded_keys(key_mask, q.shape[1]),
        num_heads=Hq,
        num_key_value_heads=k.shape[2],
        input_layout="BSND",
        scale=scale if scale is not None else 1.0 / math.sqrt(D),
        sparse_mode=0,
        inner_precise=2 if key_mask is not None else 0,
        softmax_lse_flag=True,
    )
    return out, lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])


class NpuDriver(Driver):
    name = "npu"
    priority = 20
    devices = frozenset({"npu"})
    dtypes = frozenset({torch.float16, torch.bfloat16})

    #: upper bound on the gathered keys and values of one chunk of query frames
    gather_budget_bytes = 1 << 30

    def is_available(self, device_type: str) -> Availability:
        base = super().is_available(device_type)
        if not base:
            return base
        if importlib.util.find_spec("torch_npu") is None:
            return Availability.no(f"torch_npu is not installed ({INSTALL_HINT})")
        try:
            import torch_npu
        except Exception as error:
            return Availability.no(f"torch_npu failed to import: {type(error).__name__}: {error} ({INSTALL_HINT})")
        if not hasattr(torch_npu, "npu_fused_infer_attention_score"):
            return Availability.no(f"torch_npu {getattr(torch_npu, '__version__', '?')} has no "
                                   "npu_fused_infer_attention_score")
        return Availability.yes("torch_npu fused infer attention (FIA)")

    def check(self, problem: AttentionProblem) -> list[str]:
        reasons = super().check(problem)
        D, Hq, Hkv = problem.head_dim, problem.q_heads, problem.kv_heads
        if D % 16 or D > 512:
            reasons.append(f"head_dim {D}: FIA takes multiples of 16 up to 512")
        if Hq > 256 or Hq * D >= 65535:
            reasons.append(f"{Hq} heads x {D}: FIA's BSND layout needs heads <= 256 and heads x head_dim < 65535")
        if Hq // Hkv > 64:
            reasons.append(f"GQA ratio {Hq // Hkv}: FIA allows at most 64 query heads per key/value head")
        return reasons

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> NpuPrepared:
        device = problem.device
        text = video = None
        if plan.text_tokens:
            text = torch.arange(plan.text_start, plan.text_start + plan.text_tokens, device=device)
            video = torch.arange(plan.video_start, plan.video_start + plan.video_tokens, device=device)
        index = None
        if not plan.is_dense:
            index = split.build_index(plan, problem, self.gather_budget_bytes, expanded_heads=False)
        return NpuPrepared(plan, index, video, text)

    def run(self, prepared, q, k, v, key_padding_mask=None, scale=None):
        plan = prepared.plan
        B, S = q.shape[:2]
        key_mask = None
        if key_padding_mask is not None:
            key_mask = torch.ones(B, S, dtype=torch.bool, device=q.device)
            key_mask[:, plan.text_start : plan.text_start + plan.text_tokens] = key_padding_mask.bool()
        if prepared.split is None:
            return self._dense_rows(prepared, q, k, v, key_padding_mask, scale)
        out = torch.empty_like(q)
        if plan.text_tokens:
            ts, nt = plan.text_start, plan.text_tokens
            out[:, ts : ts + nt] = self._dense_rows(prepared, q[:, ts : ts + nt], k, v, key_padding_mask, scale)
        split.run_video_queries(prepared.split, plan, q, k, v, key_mask, scale, out, fused_attention)
        return out

    @staticmethod
    def _dense_rows(prepared, q, k, v, key_padding_mask, scale):
        """Queries ``q`` against every key. A padding mask only concerns the text keys, so those are a
        second partial (mask of queries x text tokens) rather than a mask over the whole sequence."""
        if key_padding_mask is None:
            return fused_attention(q, k, v, None, scale)[0]
        video, text = prepared.video_keys, prepared.text_keys
        parts = [
            fused_attention(q, k.index_select(1, video), v.index_select(1, video), None, scale),
            fused_attention(q, k.index_select(1, text), v.index_select(1, text), key_padding_mask, scale),
        ]
        out = torch.empty_like(q)
        partial.merge(parts, out)
        return out
