"""Frames in the sequence's own unit: transformers that patch time (CogVideoX 1.5, ``patch_size_t=2``) are
planned in token frames, with their own horizon, knobs converted by video frames per token frame, and log
lines that name the unit. Checked over a table of transformer configs with and without temporal patching,
through the real pipeline where one exists for the config."""

from __future__ import annotations

import logging

import pytest
import torch

import lvsa
from lvsa.adapters import adapter_for
from lvsa.geometry import FAMILIES, token_frames
from lvsa.planning import knobs_from_settings
from lvsa_app.models import example_model


def _cogvideox(patch_size_t):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=49, patch_size=2,
        patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=True, patch_bias=patch_size_t is None,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, frames, steps=1):
    inputs = example_model("cogvideox").pipeline_inputs(pipe, None, seed=0)
    with torch.inference_mode():
        pipe(**inputs, height=64, width=64, num_frames=frames, num_inference_steps=steps, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(0), output_type="latent")


# (patch_size_t, video frames, expected token frames, expected dense)
COG_TABLE = [
    (None, 49, 13, True),    # CogVideoX 1.0 at its horizon
    (None, 97, 25, False),   # and beyond it
    (2, 81, 11, True),       # CogVideoX 1.5 default length: 21 latent frames padded to 22 = 11 token frames
    (2, 161, 21, True),      # 1.5's longest documented length (16N+1, N=10): still dense
    (2, 177, 23, False),     # beyond it: sparse
]


@pytest.mark.parametrize(("patch_t", "frames", "tokens", "dense"), COG_TABLE,
                         ids=[f"pt{p}-{f}f" for p, f, _, _ in COG_TABLE])
def test_cogvideox_plans_in_token_frames(patch_t, frames, tokens, dense, caplog):
    pipe = _cogvideox(patch_t)
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(pipe, lvsa.LVSASettings())
    _run(pipe, frames)
    plan = handle.runtime.last_plan
    assert handle.stats.sparse_calls > 0 and handle.stats.fallback_calls == 0
    assert plan.latent_frames == tokens, "the plan's frames must be the sequence's token frames"
    assert plan.is_dense == dense, plan.summary()
    per_token = 4 * (patch_t or 1)
    knobs = handle.runtime.knobs
    assert knobs.temporal_patch == (patch_t or 1)
    assert knobs.window == 12 // per_token and knobs.n_first == -(-4 // per_token)
    if patch_t:
        assert knobs.reference_latent_frames == 41 and knobs.reference_frames == 21
        assert f"target_token_frames={tokens}" in caplog.text
        assert f"target_latent_frames={tokens * 2}" in caplog.text
        assert "(token frames of 2 latent frames)" in caplog.text
    else:
        assert f"target_latent_frames={tokens} extension_ratio=" in caplog.text
        assert "token" not in plan.extension_line()


def test_a_transformer_that_patches_time_is_planned_in_token_frames_by_construction():
    """No family entry for it: a Wan transformer with patch (2, 2, 2) still gets token frames and knobs."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(2, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=32, ffn_dim=16, num_layers=1, rope_max_seq_len=256,
    )
    adapter = adapter_for(transformer)
    assert adapter.temporal_patch(transformer) == 2
    family = adapter.model_family(transformer)
    assert family.temporal_patch == 2 and family.video_frames_per_plan_frame() == 8
    handle = lvsa.apply(transformer, lvsa.LVSASettings(reference_latent_frames=8))
    with torch.inference_mode():
        transformer(torch.randn(1, 4, 20, 8, 8), torch.tensor([500]), torch.randn(1, 3, 8))
    plan = handle.runtime.last_plan
    assert plan.latent_frames == 10 and plan.temporal_patch == 2  # 20 latent frames, 2 per token frame
    assert handle.runtime.knobs.reference_frames == 4 and not plan.is_dense


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_converts_knobs_through_its_frame_unit(name):
    family = FAMILIES[name]
    per = family.video_frames_per_plan_frame()
    settings = lvsa.LVSASettings(window_size=3 * per, n_first_frames=per + 1, auto_keyframes=False,
                                 key_frame_interval=5 * per)
    knobs = knobs_from_settings(settings, family)
    assert (knobs.window, knobs.n_first, knobs.key_frame_interval) == (3, 2, 5)
    assert knobs.reference_frames == token_frames(family.reference_latent_frames, family.temporal_patch)


def test_window_not_a_multiple_of_the_frame_unit_is_said(caplog):
    caplog.set_level(logging.WARNING, logger="lvsa")
    knobs = knobs_from_settings(lvsa.LVSASettings(window_size=10), FAMILIES["wan"])
    assert knobs.window == 2
    assert "window_size=10 video frames is not a multiple of 4" in caplog.text and "using 8" in caplog.text
    caplog.clear()
    knobs_from_settings(lvsa.LVSASettings(), FAMILIES["cogvideox-1.5"])  # the default is not the user's choice
    assert "window_size" not in caplog.text
