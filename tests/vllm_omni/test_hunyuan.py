"""vLLM-Omni's own HunyuanVideo 1.5 transformer (small, random weights, text after the video with padding),
whose layers carry no video_layout: the transformer's hook reports the grid and the timestep, lvsa's step
tracker follows the steps, the padding mask is honoured as lvsa's key padding. Equal to vLLM-Omni's dense SDPA
within the horizon, equal to lvsa's float64 reference driver beyond it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm_omni", reason="vLLM-Omni is not installed (tox -e vllm-omni)")

from models import hunyuan_forward, small_hunyuan
from vllm_omni.diffusion.data import AttentionConfig, AttentionSpec, OmniDiffusionConfig

import lvsa
from lvsa_vllm_omni import host


def served(backend: str | None = "LVSA") -> OmniDiffusionConfig:
    attention = AttentionConfig(per_role={"self": AttentionSpec(backend=backend)}) if backend else AttentionConfig()
    return OmniDiffusionConfig(model_class_name="HunyuanVideo15Pipeline", diffusion_attention_config=attention)


def latents(frames: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 9, frames, 4, 4, generator=torch.Generator().manual_seed(1))


def test_within_the_horizon_equal_to_dense_sdpa_with_padded_text():
    lvsa_config, dense_config = served(), served(None)
    x = latents(9)
    out = hunyuan_forward(small_hunyuan(lvsa_config), lvsa_config, x, 900.0)
    dense = hunyuan_forward(small_hunyuan(dense_config), dense_config, x, 900.0)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    serving = host.host()
    assert serving.family.name == "hunyuan" and serving.stats.sparse_calls == 2 and serving.stats.fallback_calls == 0


def test_beyond_the_horizon_equal_to_the_reference_driver_and_rotating(monkeypatch):
    config = served()
    model = small_hunyuan(config)
    x = latents(41)
    sparse = [hunyuan_forward(model, config, x, t) for t in (900.0, 800.0)]
    serving = host.host()
    plan = serving.plans.last_plan
    assert plan.density < 1 and plan.text_tokens >= 6 and plan.text_position == "after"  # text (and byT5) tokens
    assert plan.step == 1 and serving.stats.plan_builds == 2  # the timestep went down: the next step
    monkeypatch.setenv("LVSA_BACKEND", "reference")
    lvsa.reset_settings()
    host.reset_host()
    reference = [hunyuan_forward(model, config, x, t) for t in (900.0, 800.0)]
    for a, b in zip(sparse, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_regional_compile_does_not_recompile_per_step():
    """vLLM-Omni compiles HunyuanVideo 1.5's blocks regionally: the joint call goes through lvsa's op, which reads
    the grid and step the transformer's hook reported at run time, so the steps reuse the graphs."""
    from torch._dynamo.utils import counters
    from vllm_omni.diffusion.compile import regionally_compile

    config = served()
    model = small_hunyuan(config)
    x = latents(41)
    timesteps = (900.0, 800.0, 700.0)
    eager = [hunyuan_forward(model, config, x, t) for t in timesteps]
    torch._dynamo.reset()
    counters.clear()
    regionally_compile(model, dynamic=True, backend="eager")
    graphs, compiled = [], []
    for t in timesteps:
        compiled.append(hunyuan_forward(model, config, x, t))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * len(timesteps), graphs
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
