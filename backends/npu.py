"""Ascend NPU driver: the plan through ``torch_npu.npu_fused_infer_attention_score`` (FIA).

Why FIA rather than ``npu_fusion_attention``: the plan is run as the split of ``backends/split.py`` (all
video queries against the global frames, each frame against its window, merged by log-sum-exp), which
needs each partial result's log-sum-exp. FIA returns it directly (``softmax_lse_flag``, natural log,
``(B, N, S, 1)``), takes GQA as ``num_key_value_heads``, and is the inference op (graph mode supported);
``npu_fusion_attention`` is the training op and returns the softmax max and sum in 8-wide blocks instead.
Neither op takes a block-sparse mask, and a token mask at video lengths (S x S) would not fit.

The op's contract, kept here (sources: Ascend op-plugin ``docs/zh/custom_APIs/torch_npu/
torch_npu-npu_fused_infer_attention_score.md``, its binding schema ``op_plugin/config/op_plugin_functions.yaml``,
ops-transformer ``aclnnFusedInferAttentionScoreV4.md``; ``tests/fakes/torch_npu.py`` enforces each rule):

- layout BSND is diffusers' ``[batch, seq, heads, head_dim]`` as is; inputs must be contiguous;
- ``scale`` defaults to 1.0, so 1/sqrt(head_dim) is always passed;
- ``atten_mask`` marks what is **excluded** (True = not computed), the opposite of lvsa's key_padding_mask
  (True = keep), so the padding mask is inverted once, in :func:`excluded_keys`, and shaped for the branch:
  ``(B, 1, Q_S, KV_S)`` when Q_S > 1 (prompt branch), ``(B, KV_S)`` when Q_S == 1 (single-query branch);
- ``inner_precise`` is 2 (row correction) for masked calls with Q_S > 1, and 0 when Q_S == 1, the only
  values that branch accepts besides 1;
- a sample whose keys are all masked (an empty negative prompt padded to the text length) is not attended
  at all: :func:`fused_attention` gives its rows ``lse = -inf`` and zeros from the mask alone, whatever the op
  returns for them (``+inf`` under the row correction; undefined in the single-query branch);
- at most 65536 batch entries per call (B axis limit): the frame chunks of the window calls are capped.

Why not ``npu_block_sparse_attention`` (CANN 9.0, Atlas A2/A3) for the video part: it takes an int8 mask of
(query block x key block) cells with a block shape whose key side is a multiple of 128, head dim 64 or 128,
and returns the log-sum-exp; it has no token-level mask inside a block. lvsa's plans are frame-aligned, and
a frame is P tokens (Wan 480p: 1560 = 12 x 128 + 24; HunyuanVideo 1.5: 1590): a key block that straddles a
frame boundary holds keys of an attended and of a non-attended frame, so a block mask can only over-attend
(a superset of the plan) or drop attended keys. Making it exact would need each frame padded to a multiple
of 128 keys, and the padded keys would still be attended (no per-token mask, and ``actual_seq_lengths_kv``
cuts only the end of each batch entry), or the boundary blocks computed a second time by FIA and merged,
which costs what the block-sparse op would save and doubles the code that no Ascend host here can check.
The exact path therefore stays the FIA split. The block-sparse op would be worth it for plans whose P is a
multiple of 128, and the default resolutions give none (Wan 480p 1560, 720p 3600; CogVideoX 1350;
HunyuanVideo 1.5 480p 1590).

Not verified on Ascend hardware: tested against a strict CPU emulation of the op's documented contract
(``tests/fakes/torch_npu.py``); ``tox -e npu`` runs the same parity matrix on a real host."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from lvsa.device import NPU_INSTALL_HINT as INSTALL_HINT
from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.kernels import split
from lvsa.kernels.attention_ops import merge, sequence_key_mask, text_keys, without_empty_samples
from lvsa.plan import SparsePlan

#: the op's B axis limit ("各轴取值范围速查": B <= 65536)
MAX_BATCH = 65536



@dataclass(frozen=True)
class NpuPrepared(Prepared):
    split: split.SplitIndex | None  # None: the plan is dense
    video_keys: torch.Tensor | None  # positions of all video tokens (dense rows with padded text)
    text_keys: torch.Tensor | None


def excluded_keys(key_mask: torch.Tensor, queries: int) -> torch.Tensor:
    """lvsa's ``[B, L]`` keep-mask as FIA's ``atten_mask`` (bool, True = excluded), in the shape the op's
    branch takes: ``(B, 1, Q_S, KV_S)`` for the prompt branch (Q_S > 1), ``(B, KV_S)`` for the single-query
    branch (Q_S == 1), which documents only ``(B, KV_S)``-style masks."""
    excluded = ~key_mask.bool()
    if queries == 1:
        return excluded.contiguous()
    B, L = key_mask.shape
    return excluded[:, None, None, :].expand(B, 1, queries, L).contiguous()


def fused_attention(q, k, v, key_mask=None, scale=None):
    """FIA over ``[B, S, H, D]`` tensors (GQA allowed): ``(out [B, S, Hq, D], lse [B, Hq, S])``.

    A sample whose keys are all masked has no attention over this key set: its rows come back with
    ``lse = -inf`` and a zero output, so that the log-sum-exp merge gives them no weight. The op's own value
    for such rows is not used: under the row correction (``inner_precise=2``, Q_S > 1) it is the documented
    ``+inf`` ("invalid data"), which the merge would read as all the weight; the single-query branch (Q_S ==
    1) has no row correction (``inner_precise`` only 0 or 1 there) and leaves such rows undefined."""
    import torch_npu

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    queries, Hq, D = q.shape[1], q.shape[2], q.shape[3]
    masked = key_mask is not None
    out, lse = torch_npu.npu_fused_infer_attention_score(
        q, k, v,
        atten_mask=excluded_keys(key_mask, queries) if masked else None,
        num_heads=Hq,
        num_key_value_heads=k.shape[2],
        input_layout="BSND",
        scale=scale if scale is not None else 1.0 / math.sqrt(D),
        sparse_mode=0,
        inner_precise=2 if masked and queries > 1 else 0,
        softmax_lse_flag=True,
    )
    return without_empty_samples(out, lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2]), key_mask)


class NpuDriver(Driver[NpuPrepared]):
    name = "npu"
    priority = 20
    devices = frozenset({"npu"})
    dtypes = frozenset({torch.float16, torch.bfloat16})

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

    #: the op takes at most this many batch entries: ring steps batch query frames within it
    max_batch: ClassVar[int | None] = MAX_BATCH

    def check_lse(self, problem: AttentionProblem) -> list[str]:
        return []  # FIA returns the log-sum-exp itself (softmax_lse_flag)

    def attend_with_lse(self, q, k, v, key_mask, scale):
        return fused_attention(q, k, v, key_mask, scale)

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> NpuPrepared:
        device = problem.device
        text, video = text_keys(plan, device), None
        if plan.text_tokens:
            video = torch.arange(plan.video_start, plan.video_start + plan.video_tokens, device=device)
        index = None
        if not plan.is_dense:
            index = split.build_index(plan, problem, self.gather_budget_bytes, expanded_heads=False)
            # the window calls batch B x frames-per-chunk entries; the op takes at most MAX_BATCH
            index = replace(index, frames_per_chunk=max(1, min(index.frames_per_chunk, MAX_BATCH // problem.batch)))
        return NpuPrepared(plan, problem, index, video, text)

    def run(self, prepared: NpuPrepared, q, k, v, key_padding_mask=None):
        plan, scale = prepared.plan, prepared.scale
        B = q.shape[0]
        key_mask = sequence_key_mask(plan, key_padding_mask, B, q.device)
        if prepared.split is None:
            return self._dense_rows(prepared, q, k, v, key_padding_mask, scale)
        out = torch.empty_like(q)
        if plan.text_tokens:
            ts, nt = plan.text_start, plan.text_tokens
            out[:, ts : ts + nt] = self._dense_rows(prepared, q[:, ts : ts + nt], k, v, key_padding_mask, scale)
        split.run_video_queries(prepared.split, plan, q, k, v, key_mask, scale, out, fused_attention)
        return out

    @staticmethod
    def _dense_rows(prepared: NpuPrepared, q, k, v, key_padding_mask, scale):
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
        merge(parts, out)
        return out
