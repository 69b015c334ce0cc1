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


def test_two_transformers_share_the_step_and_its_plan():
    """Wan 2.2 A14B serves two transformers (high and low noise) built the same way: both run through lvsa, and
    the step's plan is built once and shared."""
    config = served()
    high, low = small_wan(config, seed=0), small_wan(config, seed=1)
    x = latents(41)
    for step in range(2):
        forward(high if step == 0 else low, config, x, step=step)
        forward(high if step == 0 else low, config, x, step=step)
    serving = host.host()
    assert serving.stats.plan_builds == 2 and serving.stats.sparse_calls == 8 and serving.stats.fallback_calls == 0


def test_the_image_conditioned_variant_runs_sparse(monkeypatch):
    """Wan I2V (image tokens through cross-attention, 36 input channels): self-attention is the same video-only
    sequence, planned by lvsa and equal to the reference driver."""
    config = served()
    model = small_wan(config, in_channels=36, image_dim=8, added_kv_proj_dim=32)
    x = torch.randn(1, 36, 41, 4, 4, generator=torch.Generator().manual_seed(3))
    image = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(4))
    from models import vllm_config
    from vllm.config import set_current_vllm_config
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.diffusion.forward_context import set_forward_context, set_forward_context_denoise_step_idx

    def run():
        with torch.no_grad(), set_current_diffusion_config(config), set_current_vllm_config(vllm_config()), \
                set_forward_context(omni_diffusion_config=config):
            set_forward_context_denoise_step_idx(1)
            out = model(x, torch.tensor([500.0]), torch.ones(1, 5, 8), encoder_hidden_states_image=image,
                        return_dict=False)
        return out[0] if isinstance(out, tuple) else out

    sparse = run()
    assert host.host().plans.last_plan.density < 1 and host.host().stats.fallback_calls == 0
    monkeypatch.setenv("LVSA_BACKEND", "reference")
    lvsa.reset_settings()
    host.reset_host()
    torch.testing.assert_close(sparse, run(), rtol=1e-4, atol=1e-4)
