"""sdpa driver specifics: chunked gathering and the one-call dense path."""

from __future__ import annotations

import torch

import lvsa
from lvsa import registry
from lvsa.backends.reference import reference_attention
from lvsa.backends.sdpa import SdpaDriver


def _inputs(plan, heads=2, dim=8, batch=2):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, plan.seq_len, heads, dim, generator=gen) for _ in range(3)]


def test_chunked_gather_equals_one_chunk(monkeypatch):
    plan = lvsa.make_plan(12, 5, text_tokens=3, settings=lvsa.LVSASettings(reference_latent_frames=4))
    q, k, v = _inputs(plan)
    driver = SdpaDriver()
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan)
    whole = driver.run(driver.prepare(plan, problem), q, k, v)
    monkeypatch.setattr(SdpaDriver, "gather_budget_bytes", 1)  # one frame per chunk
    prepared = driver.prepare(plan, problem)
    assert prepared.frames_per_chunk == 1
    chunked = driver.run(prepared, q, k, v)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(chunked.double(), reference_attention(q, k, v, plan), atol=1e-5)


def test_dense_plan_needs_no_index():
    plan = lvsa.make_plan(5, 4, model="wan")
    q, k, v = _inputs(plan)
    prepared = registry.drivers()["sdpa"].prepare(plan, lvsa.AttentionProblem.from_tensors(q, k, v, plan))
    assert plan.is_dense and prepared.key_index is None
