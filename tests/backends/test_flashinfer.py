"""The flashinfer driver's integration logic, on CPU, against a stand-in of FlashInfer's block-sparse
wrapper that follows its documented semantics, traps included: NHD layout, output dtype float16 unless
``o_data_type`` is given, log-sum-exp in base 2, ``R x C`` blocks with N a multiple of C. The real kernels
run in the same parity matrix on a CUDA host (tox -e cuda)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import lvsa
from lvsa.backends.flashinfer import FlashInferDriver
from lvsa.backends.reference import reference_attention
from lvsa.plan import PatternKnobs, build_plan


class FakeBlockSparseAttentionWrapper:
    plans = 0

    def __init__(self, float_workspace_buffer, backend="auto"):
        self.device = float_workspace_buffer.device

    def plan(self, indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim, *, sm_scale=None,
             q_data_type="float16", kv_data_type=None, o_data_type="float16", **_):
        type(self).plans += 1
        assert N % C == 0, "FlashInfer reshapes k into N // C pages"
        self.indptr, self.indices = indptr.tolist(), indices.tolist()
        self.M, self.N, self.R, self.C = M, N, R, C
        self.heads = (num_qo_heads, num_kv_heads)
        self.q_dtype = torch.float16 if q_data_type == "float16" else q_data_type
        self.o_dtype = torch.float16 if o_data_type == "float16" else o_data_type
        self.scale = sm_scale if sm_scale is not None else 1 / math.sqrt(head_dim)

    def run(self, q, k, v, out=None, lse=None, return_lse=False):
        assert q.dim() == 3 and q.shape[0] == self.M, "NHD layout: (tokens, heads, head_dim)"
        # the kernels are compiled for the planned dtypes: anything else is garbage on a GPU
        assert q.dtype == k.dtype == v.dtype == self.q_dtype, f"planned {self.q_dtype}, got {q.dtype}"
        assert out is None or out.dtype == self.o_dtype, f"out is {out.dtype}, planned output {self.o_dtype}"
        Hq, Hkv = self.heads
        groups = Hq // Hkv
        keep = torch.zeros(self.M, self.N, dtype=torch.bool)
        for row in range(len(self.indptr) - 1):
            for col in self.indices[self.indptr[row] : self.indptr[row + 1]]:
                keep[row * self.R : (row + 1) * self.R, col * self.C : (col + 1) * self.C] = True
        kk = k.double().repeat_interleave(groups, 1)
        vv = v.double().repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * self.scale
        scores = scores.masked_fill(~keep[None], float("-inf"))
        o = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv).to(self.o_dtype)
        if out is not None:
            out.copy_(o)
            o = out
        log2_sum = (torch.logsumexp(scores, -1) / math.log(2)).t().float()  # [M, Hq], base 2
        return (o, log2_sum) if return_lse else o


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.ModuleType("flashinfer")
    module.BlockSparseAttentionWrapper = FakeBlockSparseAttentionWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    FakeBlockSparseAttentionWrapper.plans = 0
    return module


def _run(plan, heads=(4, 2), batch=2, dtype=torch.bfloat16, padded=True, scale=None):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, plan.seq_len, heads[0], 64, generator=gen).to(dtype)
    k, v = (torch.randn(batch, plan.seq_len, heads[1], 64, generator=gen).to(dtype) for _ in range(2))
    mask = None
    if plan.text_tokens and padded:
        mask = torch.ones(batch, plan.text_tokens, dtype=torch.bool)
        mask[0, -2:] = False
    driver = FlashInferDriver()
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, mask, scale)
    out = driver.run(driver.prepare(plan, problem), q, k, v, mask)
    return out, reference_attention(q, k, v, plan, mask, scale)


@pytest.mark.parametrize("position", ["before", "after"])
def test_text_tokens_merge_through_base2_lse(fake_flashinfer, position):
    plan = build_plan(12, 5, PatternKnobs(4, 1.0, 1, 1, None, None), text_tokens=6, text_position=position, step=2)
    out, expected = _run(plan)
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 3e-2


def test_video_only_writes_in_place_with_the_right_dtype(fake_flashinfer):
    plan = build_plan(12, 4, PatternKnobs(4, 1.0, 1, 1, None, None), step=5)
    for dtype in (torch.bfloat16, torch.float16):
        out, expected = _run(plan, dtype=dtype)
        assert out.dtype == dtype and (out.double() - expected).abs().max() < 3e-2


def test_explicit_scale(fake_flashinfer):
    plan = build_plan(12, 4, PatternKnobs(4, 1.0, 1, 1, None, None), text_tokens=3)
    out, expected = _run(plan, scale=0.07)
    assert (out.double() - expected).abs().max() < 3e-2


def test_dense_plan_does_not_plan_flashinfer(fake_flashinfer):
    plan = build_plan(6, 4, PatternKnobs(21, 1.0, 1, 1, None, None))
    out, expected = _run(plan, dtype=torch.float32)
    assert FakeBlockSparseAttentionWrapper.plans == 0 and (out.double() - expected).abs().max() < 1e-5


def test_blocks_are_frames(fake_flashinfer):
    plan = build_plan(10, 6, PatternKnobs(4, 1.0, 1, 1, None, None))
    q = torch.zeros(1, plan.seq_len, 2, 64, dtype=torch.bfloat16)
    prepared = FlashInferDriver().prepare(plan, lvsa.AttentionProblem.from_tensors(q, q, q, plan))
    wrapper = prepared.wrapper
    assert (wrapper.R, wrapper.C, wrapper.M, wrapper.N) == (6, 6, 60, 60)
    assert wrapper.indptr == list(plan.indptr) and wrapper.indices == list(plan.indices)


def test_not_installed_reason_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flashinfer" else real(name, *a))
    reason = FlashInferDriver().is_available("cuda").reason
    assert "pip install 'lvsa[flashinfer]'" in reason
