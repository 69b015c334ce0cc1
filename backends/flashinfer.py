"""FlashInfer block-sparse attention on CUDA: one latent frame per block.

The plan's frame-level CSR is exactly FlashInfer's block-sparse row format with block size ``R = C = P``
(tokens per frame), so the video part runs in one ``BlockSparseAttentionWrapper`` call per batch element,
planned once per plan change (``plan()`` copies indices to the device and picks kernels; ``run()`` does no
host work). Text tokens, when the model has them in the sequence, are attended by every video query in a
separate call whose log-sum-exp merges with FlashInfer's (FlashInfer's is base 2); text queries are dense
rows (cuDNN SDPA). A dense plan runs cuDNN SDPA, the faster dense kernel.

The first use of a (dtype, head size) on a machine compiles FlashInfer's kernels (about two minutes on an
H100); they are cached under ``~/.cache/flashinfer``. Install with ``pip install 'lvsa[flashinfer]'``."""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from lvsa import log, registry
from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.errors import DriverUnavailable, GeometryError
from lvsa.kernels.attention_ops import (
    attend_with_lse,
    dense_attention,
    lse_kernel_reason,
    merge,
    sequence_key_mask,
    text_keys,
)
from lvsa.plan import SparsePlan

_LN2 = math.log(2.0)
_workspaces: dict[torch.device, torch.Tensor] = {}
_compiled: set[tuple[Any, ...]] = set()
_lock = threading.Lock()


@dataclass(frozen=True)
class FlashInferPrepared(Prepared):
    wrapper: Any  # flashinfer.BlockSparseAttentionWrapper, planned; None for a dense plan
    text_keys: torch.Tensor | None  # positions of the text tokens (attended by every video query)


class FlashInferDriver(Driver[FlashInferPrepared]):
    name = "flashinfer"
    priority = 30
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = frozenset({64, 128, 256})

    #: float workspace shared by all wrappers of a device (FlashInfer recommends 128 MB)
    workspace_bytes = 128 << 20

    def is_available(self, device_type: str) -> Availability:
        base = super().is_available(device_type)
        if not base:
            return base
        if importlib.util.find_spec("flashinfer") is None:
            return Availability.no("flashinfer is not installed (pip install 'lvsa[flashinfer]')")
        present, (major, minor) = registry.device_capability("cuda")
        if not present:
            return present
        if major < 8:
            return Availability.no(f"needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}")
        return Availability.yes(f"FlashInfer block-sparse attention (sm_{major}{minor})")

    def check(self, problem: AttentionProblem) -> list[str]:
        reasons = super().check(problem)
        if problem.text_tokens:  # text keys are attended through torch's kernels with log-sum-exp
            why = lse_kernel_reason(problem.device_type, problem.dtype, problem.head_dim)
            if why:
                reasons.append(f"text tokens: {why}")
        return reasons

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> FlashInferPrepared:
        text = text_keys(plan, problem.device)
        if plan.is_dense:
            return FlashInferPrepared(plan, problem, None, text)
        try:
            import flashinfer
        except Exception as error:  # installed but broken (CUDA mismatch, missing nvcc...)
            raise DriverUnavailable(f"flashinfer failed to import: {type(error).__name__}: {error}") from error

        T, P = plan.latent_frames, plan.patches_per_frame
        indptr = torch.tensor(plan.indptr, dtype=torch.int32)
        indices = torch.tensor(plan.indices, dtype=torch.int32)
        # FlashInfer's own bound check lets index N // C through; ours is exact
        if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < T):
            raise GeometryError(f"block indices outside 0..{T - 1}")
        device = torch.device(problem.device_type, problem.device_index or 0)
        wrapper = flashinfer.BlockSparseAttentionWrapper(_workspace(device, self.workspace_bytes))
        key = (problem.dtype, problem.head_dim, problem.q_heads // problem.kv_heads, device)
        first = key not in _compiled
        if first:
            log.info(
                f"flashinfer: first use of {str(problem.dtype)[6:]} head_dim={problem.head_dim} in this process; "
                "on a fresh machine this compiles FlashInfer's kernels (about 2 minutes), cached in ~/.cache/flashinfer"
            )
        start = time.perf_counter()
        wrapper.plan(
            indptr, indices, plan.video_tokens, plan.video_tokens, P, P,
            problem.q_heads, problem.kv_heads, problem.head_dim,
            q_data_type=problem.dtype, kv_data_type=problem.dtype, o_data_type=problem.dtype,
            sm_scale=problem.scale,  # fixed at planning time: run() never rescales q
        )
        if first:
            with _lock:
                _compiled.add(key)
            elapsed = time.perf_counter() - start
            if elapsed > 5:
                log.info(f"flashinfer: kernels ready after {elapsed:.0f} s")
        return FlashInferPrepared(plan, problem, wrapper, text)

    def run(self, prepared: FlashInferPrepared, q, k, v, key_padding_mask=None):
        plan, scale = prepared.plan, prepared.scale
        B = q.shape[0]
        key_mask = sequence_key_mask(plan, key_padding_mask, B, q.device)
        if prepared.wrapper is None:
            return dense_attention(q, k, v, key_mask, scale)

        out = torch.empty_like(q)
        vs, V = plan.video_start, plan.video_tokens
        if plan.text_tokens:
            ts, nt = plan.text_start, plan.text_tokens
            out[:, ts : ts + nt] = dense_attention(q[:, ts : ts + nt], k, v, key_mask, scale)
            text = prepared.text_keys
            k_text, v_text = k.index_select(1, text), v.index_select(1, text)
            text_mask = None if key_mask is None else key_mask.index_select(1, text)
        for b in range(B):
            qb = q[b, vs : vs + V].contiguous()
            kb, vb = k[b, vs : vs + V].contiguous(), v[b, vs : vs + V].contiguous()
            if not plan.text_tokens:
                prepared.wrapper.run(qb, kb, vb, out=out[b, vs : vs + V])
                continue
            o_video, lse2 = prepared.wrapper.run(qb, kb, vb, return_lse=True)  # lse: [V, Hq], base 2
            o_text, lse_text = attend_with_lse(
                q[b : b + 1, vs : vs + V], k_text[b : b + 1], v_text[b : b + 1],
                None if text_mask is None else text_mask[b : b + 1], scale,
            )
            merge([(o_video[None], (lse2 * _LN2).t()[None]), (o_text, lse_text)], out[b : b + 1, vs : vs + V])
        return out


def _workspace(device: torch.device, size: int) -> torch.Tensor:
    with _lock:
        buffer = _workspaces.get(device)
        if buffer is None:
            buffer = _workspaces[device] = torch.empty(size, dtype=torch.uint8, device=device)
        return buffer
