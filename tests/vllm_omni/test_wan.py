"""vLLM-Omni's own Wan transformer (small, random weights) with lvsa as its self-attention backend: equal to
vLLM-Omni's dense SDPA at the training horizon, sparse beyond it and equal there to lvsa's float64 reference
driver, rotating with the denoising step, and under vLLM-Omni's regional ``torch.compile`` without a
recompilation per step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm_omni", reason="vLLM-Omni is not installed (tox -e vllm-omni)")

from models import forward, small_wan
from vllm_omni.diffusion.data import AttentionConfig, AttentionSpec, OmniDiffusionConfig

import lvsa
from lvsa_vllm_omni import host


def served(backend: str | None = "LVSA", **fields) -> OmniDiffusionConfig:
    attention = AttentionConfig(per_role={"self": AttentionSpec(backend=backend)}) if backend else AttentionConfig()
    return OmniDiffusionConfig(model_class_name="Wan22Pipeline", diffusion_attention_config=attention, **fields)


def latents(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_at_the_horizon_equal_to_dense_sdpa():
    lvsa_config, dense_config = served(), served(None)
    x = latents(21)
    out = forward(small_wan(lvsa_config), lvsa_config, x, step=3)
    dense = forward(small_wan(dense_config), dense_config, x, step=3)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert host.host().stats.sparse_calls == 2 and host.host().plans.last_plan.is_dense


def test_beyond_the_horizon_sparse_and_equal_to_the_reference_driver(monkeypatch):
    lvsa_config, dense_config = served(), served(None)
    x = latents(41)
    sparse = forward(small_wan(lvsa_config), lvsa_config, x, step=2)
    plan = host.host().plans.last_plan
    assert plan.density < 1 and plan.rotating and plan.step == 2 and host.host().stats.fallback_calls == 0
    dense = forward(small_wan(dense_config), dense_config, x, step=2)
    assert (sparse - dense).abs().max() > 1e-4  # the sparse plan really ran
    monkeypatch.setenv("LVSA_BACKEND", "reference")
    lvsa.reset_settings()
    host.reset_host()
    reference = forward(small_wan(lvsa_config), lvsa_config, x, step=2)
    torch.testing.assert_close(sparse, reference, rtol=1e-4, atol=1e-4)


def test_one_plan_per_step_and_rotation_follows_the_step():
    config = served()
    model = small_wan(config)
    x = latents(41)
    for step in range(3):
        forward(model, config, x, step=step)
        forward(model, config, x, step=step)  # the other CFG branch of the same step
    serving = host.host()
    assert serving.stats.plan_builds == 3 and serving.stats.sparse_calls == 12
    assert serving.plans.last_plan.step == 2


def test_regional_compile_does_not_recompile_per_step():
    from torch._dynamo.utils import counters
    from vllm_omni.diffusion.compile import regionally_compile

    config = served()
    model = small_wan(config)
    x = latents(41)
    eager = [forward(model, config, x, step=s) for s in range(4)]
    torch._dynamo.reset()
    counters.clear()
    regionally_compile(model, dynamic=True, backend="eager")
    compiled = []
    frames = []
    for step in range(4):
        compiled.append(forward(model, config, x, step=step))
        frames.append(counters["stats"]["unique_graphs"])
    assert frames[0] >= 1 and frames == [frames[0]] * 4, frames  # compiled on the first step, reused after
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert host.host().stats.plan_builds >= 4  # the plans still rotated behind the op
