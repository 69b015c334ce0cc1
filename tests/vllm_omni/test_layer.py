"""lvsa as vLLM-Omni's ``LVSA`` backend, through vLLM-Omni's own attention layer: registration, per-role
selection, the layer against lvsa's float64 reference, bit-equal to vLLM-Omni's dense SDPA at the horizon,
and the refusals (ring, AllGather-KV, causal, per-role options)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytest.importorskip("vllm_omni", reason="vLLM-Omni is not installed (tox -e vllm-omni)")

from vllm_omni.diffusion.attention.backends.abstract import AttentionMetadata, VideoTokenLayout
from vllm_omni.diffusion.attention.backends.registry import DiffusionAttentionBackendEnum
from vllm_omni.diffusion.attention.layer import Attention
from vllm_omni.diffusion.attention.selector import get_attn_backend_for_role
from vllm_omni.diffusion.config import set_current_diffusion_config
from vllm_omni.diffusion.data import AttentionConfig, AttentionSpec, OmniDiffusionConfig
from vllm_omni.diffusion.forward_context import set_forward_context

import lvsa
from lvsa.backends.reference import reference_attention
from lvsa_vllm_omni.backend import LVSAAttentionBackend
from lvsa_vllm_omni.plugin import register

LVSA_SELF = AttentionConfig(per_role={"self": AttentionSpec(backend="LVSA")})


def config(attention=LVSA_SELF, **parallel) -> OmniDiffusionConfig:
    made = OmniDiffusionConfig(model_class_name="Wan22Pipeline", diffusion_attention_config=attention)
    for name, value in parallel.items():
        setattr(made.parallel_config, name, value)
    return made


def layer(served: OmniDiffusionConfig, heads=2, head_dim=16, **kwargs) -> Attention:
    with set_current_diffusion_config(served):
        return Attention(num_heads=heads, head_size=head_dim, causal=kwargs.pop("causal", False),
                         softmax_scale=head_dim ** -0.5, role=kwargs.pop("role", "self"), qkv_layout="BSND", **kwargs)


def video(T, P, heads=2, head_dim=16, batch=1, pad=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, T * P + pad, heads, head_dim, generator=gen) for _ in range(3)]


def metadata(T, h, w, pad=0, batch=1):
    mask = None
    if pad:
        mask = torch.ones(batch, T * h * w + pad, dtype=torch.bool)
        mask[:, T * h * w:] = False
    return AttentionMetadata(attn_mask=mask, video_layout=VideoTokenLayout(prefix_len=0, latent_grid=(T, h, w),
                                                                         used_len=T * h * w))


def run(attention: Attention, served, q, k, v, meta, step):
    with set_current_diffusion_config(served), set_forward_context(omni_diffusion_config=served):
        from vllm_omni.diffusion.forward_context import set_forward_context_denoise_step_idx

        set_forward_context_denoise_step_idx(step)
        return attention(q, k, v, meta)


def test_the_plugin_is_an_entry_point_and_registers_idempotently():
    points = importlib.metadata.entry_points(group="vllm_omni.general_plugins")
    assert any(p.value == "lvsa_vllm_omni.plugin:register" for p in points)
    register()
    register()
    assert DiffusionAttentionBackendEnum["LVSA"].get_class() is LVSAAttentionBackend


def test_per_role_selection_self_lvsa_cross_default():
    served = config()
    with set_current_diffusion_config(served):
        self_backend, _ = get_attn_backend_for_role("self", 16, served.diffusion_attention_config)
        cross_backend, _ = get_attn_backend_for_role("cross", 16, served.diffusion_attention_config)
    assert self_backend is LVSAAttentionBackend
    assert cross_backend.get_name() == "SDPA"  # vLLM-Omni's dense SDPA (TORCH_SDPA), the default here


@pytest.mark.parametrize("step", [0, 3])
def test_beyond_the_horizon_equals_the_float64_reference(step, caplog):
    served = config()
    q, k, v = video(41, 4)
    out = run(layer(served), served, q, k, v, metadata(41, 2, 2), step)
    plan = lvsa.make_plan(41, 4, model="wan", step=step)
    assert plan.density < 1 and plan.rotating
    torch.testing.assert_close(out, reference_attention(q, k, v, plan).float(), rtol=2e-5, atol=2e-5)
    assert "kfi=" in caplog.text and "extension_ratio=" in caplog.text


def test_at_the_horizon_bit_equal_to_vllm_omni_dense_sdpa():
    served, dense = config(), config(AttentionConfig())
    q, k, v = video(21, 4)
    meta = metadata(21, 2, 2)
    assert torch.equal(run(layer(served), served, q, k, v, meta, 2), run(layer(dense), dense, q, k, v, meta, 2))


def test_padding_after_used_len_is_left_out():
    """Sequence parallelism appends padding tokens (masked) past used_len: lvsa plans only the real ones."""
    served, dense = config(), config(AttentionConfig())
    q, k, v = video(21, 4, pad=3)
    meta = metadata(21, 2, 2, pad=3)
    out = run(layer(served), served, q, k, v, meta, 0)
    expected = run(layer(dense), dense, q, k, v, meta, 0)
    torch.testing.assert_close(out[:, :84], expected[:, :84], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[:, 84:]) == 0


def test_a_call_without_video_layout_fails_or_falls_back_loudly(monkeypatch, caplog):
    served = config()
    q, k, v = video(4, 4)
    with pytest.raises(ValueError, match="reason=no_video_layout"):
        run(layer(served), served, q, k, v, AttentionMetadata(), 0)
    from lvsa_vllm_omni import host

    monkeypatch.setenv("LVSA_FALLBACK", "warn")
    lvsa.reset_settings()
    host.reset_host()
    out = run(layer(served), served, q, k, v, AttentionMetadata(), 0)
    assert "[LVSA-FALLBACK]" in caplog.text and "reason=no_video_layout" in caplog.text
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize(("setting", "message"), [("ring_degree", "ring sequence parallelism"),
                                                  ("allgather_degree", "AllGather-KV")])
def test_sequence_parallelism_that_bypasses_backends_is_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        layer(config(**{setting: 2}))


def test_causal_attention_and_per_role_options_are_refused():
    with pytest.raises(ValueError, match="causal"):
        layer(config(), causal=True)


@pytest.mark.parametrize(("class_name", "config", "family", "horizon"), [
    ("Wan22Pipeline", {"in_channels": 16}, "wan", 21),
    ("Wan22Pipeline", {"in_channels": 48}, "wan-ti2v-5b", 31),  # Wan 2.2 TI2V-5B: its own 31-frame horizon
    ("Wan22I2VPipeline", {"in_channels": 36}, "wan", 21),
    ("HunyuanVideo15Pipeline", {}, "hunyuan", 33),
])
def test_the_served_model_gives_the_horizon(class_name, config, family, horizon):
    from lvsa_vllm_omni.host import served_family

    found = served_family(class_name, config)
    assert found.name == family and found.reference_latent_frames == horizon


def test_the_horizon_override_is_taken_with_a_warning(monkeypatch, caplog):
    from lvsa.geometry import FAMILIES
    from lvsa_vllm_omni.host import ServingHost

    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "33")
    lvsa.reset_settings()
    serving = ServingHost(lvsa.get_settings(), FAMILIES["wan"])
    assert serving.knobs.reference_latent_frames == 33
    assert "reference_latent_frames=33 (env) differs from the model's 21 (wan)" in caplog.text
