"""sdpa driver specifics: both sparse strategies against the reference, chunking, the dense path."""

from __future__ import annotations

import pytest
import torch

import lvsa
from lvsa.backends.reference import reference_attention
from lvsa.backends.sdpa import SdpaDriver
from lvsa.plan import PatternKnobs, build_plan


def _inputs(plan, heads=(2, 2), dim=8, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, plan.seq_len, heads[0], dim, generator=gen)
    k, v = (torch.randn(batch, plan.seq_len, heads[1], dim, generator=gen) for _ in range(2))
    return q, k, v


def _padding(batch, text):
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[0, text // 2 :] = False
    return mask


@pytest.mark.parametrize("strategy", ["split", "gather"])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_strategies_match_the_reference(strategy, position, heads):
    plan = build_plan(14, 5, PatternKnobs(5, 1.0, 1, 1, None, None), text_tokens=6, text_position=position, step=4)
    q, k, v = _inputs(plan, heads)
    mask = _padding(2, 6)
    driver = SdpaDriver(strategy)
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, mask)
    prepared = driver.prepare(plan, problem)
    assert prepared.strategy == strategy
    out = driver.run(prepared, q, k, v, mask)
    assert (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 2e-5


@pytest.mark.parametrize("strategy", ["split", "gather"])
def test_chunked_equals_one_chunk(monkeypatch, strategy):
    plan = lvsa.make_plan(12, 5, text_tokens=3, settings=lvsa.LVSASettings(reference_latent_frames=4))
    q, k, v = _inputs(plan)
    driver = SdpaDriver(strategy)
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan)
    whole = driver.run(driver.prepare(plan, problem), q, k, v)
    monkeypatch.setattr(SdpaDriver, "gather_budget_bytes", 1)  # one frame per chunk
    prepared = driver.prepare(plan, problem)
    assert (prepared.split or prepared).frames_per_chunk == 1
    chunked = driver.run(prepared, q, k, v)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(chunked.double(), reference_attention(q, k, v, plan), atol=1e-5)


def test_dense_plan_is_one_call_without_indices():
    plan = lvsa.make_plan(5, 4, model="wan")
    q, k, v = _inputs(plan)
    prepared = SdpaDriver().prepare(plan, lvsa.AttentionProblem.from_tensors(q, k, v, plan))
    assert plan.is_dense and prepared.strategy == "dense" and prepared.frame_keys is None


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="strategy"):
        SdpaDriver("fastest")


@pytest.mark.parametrize("keys", [1, 5, 16, 17])
def test_key_bias_rows_are_16_aligned(keys):
    from lvsa.kernels.attention_ops import key_bias

    mask = torch.ones(3, keys, dtype=torch.bool)
    mask[1, 0] = False
    bias = key_bias(mask, torch.bfloat16)
    assert bias.shape == (3, 1, 1, keys) and bias.stride(0) % 16 == 0
    assert torch.isinf(bias[1, 0, 0, 0]) and (bias[0] == 0).all()


def test_split_is_not_chosen_where_torch_has_no_safe_lse_kernel():
    from lvsa.kernels import attention_ops as partial

    assert partial.lse_kernel_reason("cuda", torch.float32, 128)  # cuDNN/flash are half precision only
    assert partial.lse_kernel_reason("cuda", torch.bfloat16, 256)
    assert partial.lse_kernel_reason("cuda", torch.bfloat16, 128) is None
    assert partial.lse_kernel_reason("mps", torch.float16, 64)
    problem = lvsa.AttentionProblem("cuda", 0, torch.float32, 1, 8, 2, 2, 64, 0, False, 0.125)
    assert SdpaDriver("split").check(problem)
    assert not SdpaDriver("auto").check(problem)  # auto falls back to gather instead
