"""The generic suite of the declared model families (lvsa.adapters.families): one table row per family, a small
random-weight transformer built from the real diffusers config class, saved and loaded back, and the same
checks for every row:

- at the family's horizon lvsa's output is bit-exact to the model's own attention;
- beyond it every layer call equals the float64 reference under the plan's mask, with no fallback;
- the denoising steps are counted and the keyframes rotate in float32, float16 and bfloat16;
- a batched CFG call plans both halves alike (and a padded text keeps its mask);
- ``torch.compile`` compiles once and does not recompile after the first step;
- every refused class is refused with its reason, and the README table and ``lvsa models`` agree with the
  declarations.

Adding a family is its declaration plus a row here."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

import lvsa
from lvsa import registry
from lvsa.adapters import adapter_for
from lvsa.adapters.declared import DeclaredAdapter, _lvsa_split
from lvsa.backends.reference import reference_attention, reference_with_frame_references
from lvsa.errors import ConfigError
from lvsa.families import ADAPTER_MODULES, DECLARED, REFUSED
from lvsa.models_table import text_table
from lvsa_app.models import (
    EXAMPLES,
    KANDINSKY5_TINY,
    DeclaredExample,
    ExampleModel,
    WanBackboneExample,
    example_model,
    random_prompt_embeddings,
    small_wan_vae,
)

ROOT = Path(__file__).resolve().parents[1]


def _sibling(name: str) -> Any:
    """A helper module beside this file, which its torchrun workers import too (importlib mode puts no test
    folder on the path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_calls = _sibling("family_calls")
wan_animate_2_step = _calls.wan_animate_2_step
HEIGHT = WIDTH = 8  # latent size: 4 x 4 patches of 2 (patch 1 models: 8 x 8)


@dataclass
class Row:
    family: str
    cls: str
    config: dict[str, Any]
    #: (model, latent frames, batch, generator) -> the forward's keyword arguments, without the timestep
    inputs: Callable[[Any, int, int, torch.Generator], dict[str, Any]]
    text_tokens: int = 0  # tokens of other kinds in each self-attention call (joint-attention text)
    #: the model takes a timestep per latent frame ([B, F])
    timestep_per_frame: bool = False
    #: the model attends one sample at a time (Mochi: each prompt's valid text only): a call per sample
    per_sample: bool = False
    #: the model's timestep table for the suite's timestep (1000 to 0), where it takes one (MiniMax-H3: its
    #: own clock, 0 to 1, and the keyframe's held timestep)
    timestep_table: Callable[[float], list[float]] | None = None
    #: the model's call at one step, where its forward is not one call of the inputs (WanAnimate2: a reference
    #: pass, then the generation pass over its cached keys); returns the step's output
    call: Callable[[Any, dict[str, Any], torch.Tensor], torch.Tensor] | None = None
    #: a reference pass runs before each generation pass, over the segment: one frame fewer than the grid
    reference_pass: bool = False


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _wan_like(model, frames, batch, g, **extra):
    c = model.config
    return {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_dim), **extra}


def _vace(model, frames, batch, g):
    c = model.config
    return _wan_like(model, frames, batch, g,
                     control_hidden_states=_randn(g, batch, c.vace_in_channels, frames, HEIGHT, WIDTH))


def _hunyuan_video(model, frames, batch, g):
    c = model.config
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[-1, 4:] = False  # the last prompt is padded: its two last text tokens must not be attended
    return {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_embed_dim), "encoder_attention_mask": mask,
            "pooled_projections": _randn(g, batch, c.pooled_projection_dim),
            "guidance": torch.full((batch,), 6000.0)}


def _ltx(model, frames, batch, g):
    c = model.config
    return {"hidden_states": _randn(g, batch, frames * HEIGHT * WIDTH, c.in_channels),
            "encoder_hidden_states": _randn(g, batch, 6, c.caption_channels),
            "encoder_attention_mask": torch.ones(batch, 6), "num_frames": frames, "height": HEIGHT, "width": WIDTH}


def _wan_animate(model, frames, batch, g):
    c = model.config
    segment = frames - 1  # the first grid frame is the reference image's
    return {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_dim),
            "pose_hidden_states": _randn(g, batch, c.latent_channels, segment, HEIGHT, WIDTH),
            "face_pixel_values": _randn(g, batch, 3, 4 * segment - 3, 16, 16)}


def _ltx2(model, frames, batch, g):
    c = model.config
    return {"hidden_states": _randn(g, batch, frames * HEIGHT * WIDTH, c.in_channels),
            "audio_hidden_states": _randn(g, batch, 10, c.audio_in_channels),
            "encoder_hidden_states": _randn(g, batch, 6, c.caption_channels),
            "audio_encoder_hidden_states": _randn(g, batch, 6, c.caption_channels),
            "num_frames": frames, "height": HEIGHT, "width": WIDTH, "audio_num_frames": 10}


def _cosmos(model, frames, batch, g):
    c = model.config
    return {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_embed_dim), "fps": 24}


def _text_first(model, frames, batch, g, channels_first=True):
    c = model.config
    shape = (batch, c.in_channels, frames, HEIGHT, WIDTH) if channels_first else (batch, frames, c.in_channels,
                                                                                  HEIGHT, WIDTH)
    return {"hidden_states": _randn(g, *shape), "encoder_hidden_states": _randn(g, batch, 6, c.text_embed_dim)}


def _consisid(model, frames, batch, g):
    """With the rotary tables its pipeline passes (ConsisIDPipeline._prepare_rotary_positional_embeddings)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.consisid.pipeline_consisid import get_resize_crop_region_for_grid

    c = model.config
    grid = (HEIGHT // c.patch_size, WIDTH // c.patch_size)
    crops = get_resize_crop_region_for_grid(grid, c.sample_width // c.patch_size, c.sample_height // c.patch_size)
    rope = get_3d_rotary_pos_embed(c.attention_head_dim, crops, grid, frames)
    return {**_text_first(model, frames, batch, g, channels_first=False), "image_rotary_emb": rope}


def _anyflow(model, frames, batch, g):
    c = model.config
    return {"hidden_states": _randn(g, batch, frames, c.in_channels, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_dim), "r_timestep": torch.full((batch, frames), 0.0)}


def _motif(model, frames, batch, g):
    c = model.config
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[-1, 4:] = False  # the last prompt is padded
    return {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_embed_dim), "encoder_attention_mask": mask}


def _mochi(model, frames, batch, g):
    c = model.config
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[-1, 4:] = False  # the last prompt is padded: the model drops its two last text tokens
    return {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_embed_dim), "encoder_attention_mask": mask}


def _allegro(model, frames, batch, g):
    """With the rotary embedding its pipeline passes (AllegroPipeline._prepare_rotary_positional_embeddings:
    per-axis tables, and every token's (t, h, w) position)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    c = model.config
    inputs = {"hidden_states": _randn(g, batch, c.in_channels, frames, HEIGHT, WIDTH),
              "encoder_hidden_states": _randn(g, batch, 6, c.caption_channels)}
    if c.attention_head_dim % 6:  # the accelerator test's 64-channel heads: no even third for each axis
        return inputs
    grid = (HEIGHT // c.patch_size, WIDTH // c.patch_size)
    *tables, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        c.attention_head_dim, ((0, 0), grid), grid, frames,
        (c.interpolation_scale_t, c.interpolation_scale_h, c.interpolation_scale_w))
    positions = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).reshape(-1, 3).T.reshape(3, 1, -1)
    return {**inputs, "image_rotary_emb": (tuple(tables), tuple(positions))}


def _kandinsky5(model, frames, batch, g):
    c = model.config
    return {"hidden_states": _randn(g, batch, frames, HEIGHT, WIDTH, c.in_visual_dim),
            "encoder_hidden_states": _randn(g, batch, 6, c.in_text_dim),
            "pooled_projections": _randn(g, batch, c.in_text_dim2),
            "visual_rope_pos": [torch.arange(frames), torch.arange(HEIGHT // 2), torch.arange(WIDTH // 2)],
            "text_rope_pos": torch.arange(6)}


def _kandinsky6(model, frames, batch, g):
    c = model.config
    channels = 2 * c.in_visual_dim + 1 if c.visual_cond else c.in_visual_dim  # the latent, its condition, a mask
    return {"hidden_states": _randn(g, batch, frames, HEIGHT, WIDTH, channels),
            "encoder_hidden_states": _randn(g, batch, 6, c.in_text_dim),
            "pooled_projections": _randn(g, batch, c.in_text_dim2),
            "audio_hidden_states": _randn(g, batch, 10, c.in_audio_dim)}


def _minimax_h3(model, frames, batch, g):
    """The packed sequence its modular pipeline builds (MiniMaxH3PrepareLayoutStep): [text | a first-frame
    keyframe's rows | stereo soundtrack | video]; the conditioning rows read the table's second timestep."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    c = model.config
    positions, tags, video, audio, text, conditions, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        torch.ones(6, dtype=torch.long), frames, HEIGHT, WIDTH, 5, tuple(c.patch_size), 2, 2, 0, ("first",))
    rows = torch.zeros(positions.shape[0], dtype=torch.long)
    rows[video[:conditions]] = 1
    return {"hidden_states": _randn(g, batch, video.numel(), c.in_channels * 4),
            "audio_hidden_states": _randn(g, batch, audio.numel(), c.audio_in_channels),
            "encoder_hidden_states": _randn(g, batch, 6, c.text_dim), "timestep_indices": rows,
            "token_tags": tags, "position_ids": positions, "video_indices": video, "audio_indices": audio,
            "text_indices": text}


def _wan_animate_2(model, frames, batch, g):
    """A segment as its modular pipeline passes it: the noise and its conditioning (the reference image's latent
    frame, then the segment's), and the driving video's segment with its own conditioning, one frame fewer."""
    c = model.config
    channels, condition = c.out_dim, c.in_dim - c.out_dim

    def latents(count, frame_count):
        return [_randn(g, count, frame_count, HEIGHT, WIDTH) for _ in range(batch)]

    return {"hidden_states": latents(channels, frames), "condition_latents": latents(condition, frames),
            "driving_latents": latents(channels, frames - 1), "driving_condition": latents(condition, frames - 1),
            "encoder_hidden_states": [_randn(g, 6, c.text_dim) for _ in range(batch)]}


_WAN_TINY = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
             "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2,
             "rope_max_seq_len": 64}

ROWS = [
    Row("wan-vace", "WanVACETransformer3DModel", {**_WAN_TINY, "vace_layers": [0], "vace_in_channels": 8}, _vace),
    Row("skyreels-v2", "SkyReelsV2Transformer3DModel", dict(_WAN_TINY), _wan_like),
    Row("chronoedit", "ChronoEditTransformer3DModel", dict(_WAN_TINY), _wan_like),
    Row("hunyuan-video", "HunyuanVideoTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "text_embed_dim": 16,
         "pooled_projection_dim": 8, "rope_axes_dim": (4, 6, 6)}, _hunyuan_video, text_tokens=6),
    Row("ltx-video", "LTXVideoTransformer3DModel",
        {"in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 16,
         "cross_attention_dim": 32, "num_layers": 2, "caption_channels": 16}, _ltx),
    Row("wan-animate", "WanAnimateTransformer3DModel",
        {**_WAN_TINY, "in_channels": 12, "latent_channels": 4, "image_dim": None, "motion_encoder_size": 16,
         "motion_style_dim": 16, "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16,
         "face_encoder_num_heads": 2, "inject_face_latents_blocks": 1, "motion_encoder_batch_size": 2},
        _wan_animate),
    Row("ltx-2", "LTX2VideoTransformer3DModel",
        {"in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 16,
         "cross_attention_dim": 32, "audio_in_channels": 8, "audio_out_channels": 8, "audio_num_attention_heads": 2,
         "audio_attention_head_dim": 8, "audio_cross_attention_dim": 16, "num_layers": 2, "caption_channels": 16},
        _ltx2),
    Row("cosmos", "CosmosTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
         "mlp_ratio": 2.0, "text_embed_dim": 16, "adaln_lora_dim": 8, "max_size": (64, 16, 16),
         "concat_padding_mask": False}, _cosmos),  # concat_padding_mask resizes with torchvision
    Row("consisid", "ConsisIDTransformer3DModel",
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
         "time_embed_dim": 8, "text_embed_dim": 16, "num_layers": 2, "sample_width": WIDTH, "sample_height": HEIGHT,
         "max_text_seq_length": 6, "use_rotary_positional_embeddings": True}, _consisid, text_tokens=6),
    Row("easyanimate", "EasyAnimateTransformer3DModel",
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "patch_size": 2,
         "num_layers": 2, "mmdit_layers": 2, "time_embed_dim": 8, "text_embed_dim": 16, "sample_width": WIDTH,
         "sample_height": HEIGHT}, _text_first, text_tokens=6),
    Row("mochi", "MochiTransformer3DModel",
        {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
         "pooled_projection_dim": 16, "in_channels": 4, "text_embed_dim": 16, "time_embed_dim": 8,
         "max_sequence_length": 6}, _mochi, text_tokens=6, per_sample=True),
    Row("allegro", "AllegroTransformer3DModel",  # heads of 24 channels: its rotary embedding takes a third each
        {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4, "out_channels": 4,
         "num_layers": 2, "cross_attention_dim": 48, "sample_height": HEIGHT, "sample_width": WIDTH,
         "caption_channels": 16}, _allegro),
    Row("anyflow", "AnyFlowTransformer3DModel", dict(_WAN_TINY), _anyflow, timestep_per_frame=True),
    Row("motif-video", "MotifVideoTransformer3DModel",
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_single_layers": 1, "patch_size": 2, "text_embed_dim": 16, "rope_axes_dim": (4, 6, 6)}, _motif,
        text_tokens=6),
    Row("kandinsky-5", "Kandinsky5Transformer3DModel", dict(KANDINSKY5_TINY), _kandinsky5),
    Row("kandinsky-6", "Kandinsky6Transformer3DModel",  # with its audio stream, as its released checkpoints set it
        {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 8, "time_dim": 16,
         "model_dim": 32, "ff_dim": 32, "num_text_blocks": 1, "num_visual_blocks": 2, "axes_dims": (4, 6, 6),
         "in_audio_dim": 4, "out_audio_dim": 4, "axes_dims_a": (16,), "ca_rope": True, "cross_gates": True,
         "fix_modulation": True, "text_token_padding": True}, _kandinsky6),
]
ROWS.append(
    Row("minimax-h3", "MiniMaxH3Transformer3DModel",
        {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "num_layers": 2,
         "num_refiner_layers": 1, "ffn_dim": 32, "in_channels": 4, "audio_in_channels": 4, "text_dim": 16,
         "freq_dim": 16, "time_embed_hidden_dim": 32, "time_embed_dim": 16, "rope_freq_dim": 2},
        _minimax_h3, text_tokens=6 + 16 + 10,  # text, a keyframe, the soundtrack
        timestep_table=lambda t: [1 - t / 1000, 0.999]))
ROWS.append(
    Row("wan-animate-2", "WanAnimate2Transformer3DModel",
        {"patch_size": (1, 2, 2), "text_len": 8, "in_dim": 8, "dim": 32, "ffn_dim": 32, "freq_dim": 16,
         "text_dim": 16, "out_dim": 4, "num_heads": 2, "num_layers": 2, "use_img_emb": False},
        _wan_animate_2, call=wan_animate_2_step, reference_pass=True))
BY_FAMILY = {row.family: row for row in ROWS}
FAMILY_OF = {family.name: family for family in DECLARED}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each row's model, saved with save_pretrained (what a user's checkpoint folder holds)."""
    folders = {}
    for row in ROWS:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(row.family)
        getattr(diffusers, row.cls)(**row.config).save_pretrained(folder)
        folders[row.family] = folder
    return folders


def load(saved, family, dtype=torch.float32):
    row = BY_FAMILY[family]
    return getattr(diffusers, row.cls).from_pretrained(saved[family], torch_dtype=dtype).eval()


def calls_per_forward(model, batch):
    """The layer calls of one step (both passes where a reference pass runs)."""
    layers = len(adapter_for(model).self_attention_layers(model))
    row = BY_FAMILY[adapter_for(model).name]
    return layers * (batch if row.per_sample else 1) * (2 if row.reference_pass else 1)


def horizon(model):
    return adapter_for(model).family(model).reference_latent_frames


def _placed(value, dtype, device):
    """An input on ``device``, its floating-point tensors in ``dtype`` (lists of tensors too); float64 ones
    (a packed layout's coordinates, as its pipeline passes them) stay float64."""
    if isinstance(value, torch.Tensor):
        cast = value.is_floating_point() and value.dtype != torch.float64
        return value.to(device=device, dtype=dtype if cast else value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_placed(item, dtype, device) for item in value)
    return value


def run(model, frames, timesteps=(900.0,), batch=1, dtype=torch.float32, seed=1, device="cpu"):
    """The model's outputs over ``timesteps`` (one forward each, as a denoising loop calls it)."""
    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd model's own module
    row = BY_FAMILY[adapter_for(inner).name]
    kwargs = row.inputs(inner, frames, batch, torch.Generator().manual_seed(seed))
    kwargs = {k: _placed(v, dtype, device) for k, v in kwargs.items()}
    outputs = []
    with torch.no_grad():
        for t in timesteps:
            shape = (batch, frames) if row.timestep_per_frame else (batch,)
            if row.timestep_table is None:
                timestep = torch.full(shape, t, dtype=dtype, device=device)
            else:
                timestep = torch.tensor(row.timestep_table(t), dtype=dtype, device=device)
            if row.call is not None:
                out = row.call(model, kwargs, timestep)
            else:
                out = model(**kwargs, timestep=timestep, return_dict=False)[0]
            outputs.append(out)
    return outputs


def test_every_declared_family_has_a_row():
    assert sorted(BY_FAMILY) == sorted(FAMILY_OF)
    for row in ROWS:
        assert row.cls in FAMILY_OF[row.family].classes


@pytest.mark.parametrize("family", sorted(BY_FAMILY))
def test_at_the_horizon_lvsa_is_bit_exact_to_the_model(saved, family, caplog):
    model = load(saved, family)
    frames = horizon(model)
    dense = run(model, frames, batch=2)[0]
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    try:
        sparse = run(model, frames, batch=2)[0]
    finally:
        handle.remove()
    assert torch.equal(dense, sparse)
    assert handle.stats.sparse_calls == calls_per_forward(model, 2)
    assert f"model {family}" in caplog.text
    assert torch.equal(run(model, frames, batch=2)[0], dense)  # removed: the model's own attention again


@pytest.mark.parametrize("family", sorted(BY_FAMILY))
def test_beyond_the_horizon_every_call_is_the_masked_reference(saved, family, layer_calls):
    model = load(saved, family)
    frames = 2 * horizon(model) + 1
    calls = layer_calls
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    try:
        run(model, frames, batch=2)
    finally:
        handle.remove()
    assert len(calls) == calls_per_forward(model, 2) and handle.stats.fallback_calls == 0
    row = BY_FAMILY[family]
    text_tokens = []
    for (_step, _origin, plan, video, text, padding, out), references in zip(calls, calls.references, strict=True):
        assert plan.kfi > 1 and not plan.is_dense
        # a reference pass plans the segment; its generation pass attends each frame's reference keys
        assert plan.latent_frames == (frames - 1 if row.reference_pass and references is None else frames)
        text_tokens.append(plan.text_tokens)
        assert_reference(plan, video, text, padding, out, references=references)
    if row.reference_pass:
        assert [r is not None for r in calls.references] == [False, False, True, True]
        if family in ("hunyuan-video", "motif-video"):  # the padded prompt's two last text keys are masked
            assert padding is not None and padding.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    # Mochi drops the padded prompt's two last tokens itself: its second sample has 4 text tokens
    assert text_tokens == ([6, 4] * (len(calls) // 2) if row.per_sample else [row.text_tokens] * len(calls))


# each row's model with 64-channel heads, the smallest the GPU kernels (FlashInfer, FA4) take
_HEADS_64 = {"attention_head_dim": 64}
_WIDE_HEADS = {
    **{family: _HEADS_64 for family in ("wan-vace", "skyreels-v2", "chronoedit", "anyflow", "wan-animate", "cosmos",
                                        "consisid", "easyanimate", "mochi", "minimax-h3")},
    "wan-animate-2": {"dim": 128},
    "hunyuan-video": {**_HEADS_64, "rope_axes_dim": (16, 24, 24)},
    "motif-video": {**_HEADS_64, "rope_axes_dim": (16, 24, 24)},
    "ltx-video": {**_HEADS_64, "cross_attention_dim": 128},
    "ltx-2": {**_HEADS_64, "cross_attention_dim": 128},
    "allegro": {**_HEADS_64, "cross_attention_dim": 128},
    "kandinsky-5": {"model_dim": 128, "ff_dim": 128, "axes_dims": (16, 24, 24)},
    # its released cross-modal RoPE (ca_rope) needs the audio heads as wide as the video's
    "kandinsky-6": {"model_dim": 128, "ff_dim": 128, "axes_dims": (16, 24, 24), "axes_dims_a": (64,)},
}


@pytest.mark.parametrize("family", sorted(BY_FAMILY))
def test_on_an_accelerator_every_call_is_the_masked_reference(family, accelerator, layer_calls, tmp_path):
    """Each family's model with 64-channel heads on a GPU (or NPU: ``accelerator``, required by
    LVSA_TEST_DEVICES=cuda) in bfloat16 beyond its horizon, through every driver usable there: every layer call
    equals the float64 reference within bfloat16's tolerance, none falls back."""
    from lvsa.driver_status import available_drivers

    device, row = accelerator, BY_FAMILY[family]
    torch.manual_seed(0)
    cls = getattr(diffusers, row.cls)
    cls(**{**row.config, **_WIDE_HEADS[family]}).save_pretrained(tmp_path)
    model = cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).to(device).eval()  # fp32 modules kept
    frames = 2 * horizon(model) + 1
    drivers = [d.name for d in available_drivers(device) if d.available and d.name != "reference"]
    if row.reference_pass:  # the generation pass merges two partial attentions: drivers with log-sum-exp
        drivers = [d for d in drivers if type(registry.drivers()[d]).attend_with_lse is not lvsa.Driver.attend_with_lse]
    assert drivers
    for driver in drivers:
        layer_calls.clear()
        handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error", backend=driver))
        try:
            outputs = run(model, frames, batch=2, dtype=torch.bfloat16, device=device)
        finally:
            handle.remove()
        assert len(layer_calls) == calls_per_forward(model, 2) and handle.stats.fallback_calls == 0, driver
        assert outputs[0].device.type == device and torch.isfinite(outputs[0]).all(), driver
        for (_step, _origin, plan, video, text, padding, out), references in zip(layer_calls, layer_calls.references,
                                                                                  strict=True):
            assert plan.kfi > 1 and not plan.is_dense and video[0].shape[-1] == 64 and video[0].device.type == device
            assert_reference(plan, video, text, padding, out, tolerance=3e-2, references=references)


def test_on_an_accelerator_the_image_frame_after_the_video_is_the_masked_reference(accelerator, layer_calls,
                                                                                     tmp_path):
    """Kandinsky 6's image-to-video forward (64-channel heads, bfloat16, CFG batched) beyond its horizon: the
    image frame after the video joins every call as other tokens after it, through every driver usable there,
    each call equal to the float64 reference."""
    from lvsa.driver_status import available_drivers

    device, row = accelerator, BY_FAMILY["kandinsky-6"]
    torch.manual_seed(0)
    cls = diffusers.Kandinsky6Transformer3DModel
    cls(**{**row.config, **_WIDE_HEADS["kandinsky-6"], "visual_token_type_num_embeddings": 2}).save_pretrained(tmp_path)
    model = cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).to(device).eval()
    frames = 2 * horizon(model) + 1
    kwargs = row.inputs(model, frames + 1, 2, torch.Generator().manual_seed(1))  # the video and the image frame
    types = torch.zeros(2, frames + 1, dtype=torch.long)
    types[:, -1] = 1
    kwargs.update(visual_token_type_ids=types, visual_rope_pos=(
        torch.cat([torch.arange(frames), torch.zeros(1, dtype=torch.long)]), torch.arange(HEIGHT // 2),
        torch.arange(WIDTH // 2)))
    kwargs = {k: _placed(v, torch.bfloat16, device) for k, v in kwargs.items()}
    drivers = [d.name for d in available_drivers(device) if d.available and d.name != "reference"]
    assert drivers
    for driver in drivers:
        layer_calls.clear()
        handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error", backend=driver))
        try:
            with torch.no_grad():
                model(**kwargs, timestep=torch.full((2,), 900.0, dtype=torch.bfloat16, device=device))
        finally:
            handle.remove()
        assert len(layer_calls) == calls_per_forward(model, 2) and handle.stats.fallback_calls == 0, driver
        for _step, _origin, plan, video, text, padding, out in layer_calls:
            assert plan.latent_frames == frames and text[0].shape[1] == HEIGHT * WIDTH // 4, driver
            assert_reference(plan, video, text, padding, out, tolerance=3e-2)


def test_every_family_has_wide_heads_for_the_accelerator_test():
    assert sorted(_WIDE_HEADS) == sorted(BY_FAMILY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", sorted(BY_FAMILY))
def test_steps_are_counted_and_the_keyframes_rotate(saved, family, dtype):
    model = load(saved, family, dtype)
    frames = 2 * horizon(model) + 1
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    try:
        outputs = run(model, frames, timesteps=(999.0, 667.0, 333.0), dtype=dtype)
    finally:
        handle.remove()
    layers = calls_per_forward(model, 1)
    assert handle.stats.steps == 3 and handle.stats.fallback_calls == 0
    assert handle.stats.calls_by_step == {0: [0, layers], 1: [0, layers], 2: [0, layers]}
    # one plan per step and grid (the reference pass's segment has its own): the keyframes rotate
    assert handle.stats.plan_builds == 3 * (2 if BY_FAMILY[family].reference_pass else 1)
    # a model whose output head stays float32 (MiniMax-H3's mixed-precision checkpoint) answers in float32, and
    # so does WanAnimate2's forward, whatever its dtype
    float32 = "proj_out" in (type(model)._keep_in_fp32_modules or ()) or family == "wan-animate-2"
    expected = torch.float32 if float32 else dtype
    assert all(out.dtype == expected and torch.isfinite(out).all() for out in outputs)


@pytest.mark.parametrize("family", sorted(BY_FAMILY))
def test_compile_does_not_recompile_after_the_first_step(saved, family):
    from torch._dynamo.utils import counters

    model = load(saved, family)
    frames = 2 * horizon(model) + 1
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    try:
        eager = run(model, frames, timesteps=(999.0, 667.0, 333.0))
        handle.runtime.reset()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model)
        first = run(compiled, frames, timesteps=(999.0,))
        graphs = counters["stats"]["unique_graphs"]
        rest = run(compiled, frames, timesteps=(667.0, 333.0))
        assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the first step"
    finally:
        handle.remove()
        torch._dynamo.reset()
    for got, want in zip(first + rest, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert handle.stats.plan_builds >= 3


# -- declarations, refusals and the table ---------------------------------------------------------------
@pytest.mark.parametrize("family", DECLARED, ids=lambda f: f.name)
def test_each_horizon_is_the_default_its_source_names(family):
    """A source names a pipeline's default num_frames or a config default (both read here off diffusers), or a
    release's documented length (then only the arithmetic is checked)."""
    for variant in family.variants:
        if variant.refusal:  # tested by test_a_refused_variant_is_refused_with_its_reason
            assert variant.when and not variant.source
            continue
        factor = variant.vae_temporal_factor or family.vae_temporal_factor
        pipeline = re.fullmatch(r"(\w+) default (num_frames|segment_frame_length)=(\d+)"
                                r"( \(\+1 reference frame\))?", variant.source)
        config = re.fullmatch(r"the config's default (\w+)=(\d+) \((video|latent) frames\)", variant.source)
        if pipeline:
            frames = int(pipeline[3])
            found = getattr(diffusers, pipeline[1])
            if issubclass(found, diffusers.ModularPipeline):  # an input of its blocks
                blocks = getattr(diffusers.modular_pipelines, found.default_blocks_name)()
                assert {i.name: i.default for i in blocks.inputs}[pipeline[2]] == frames
            else:
                assert inspect.signature(found.__call__).parameters[pipeline[2]].default == frames
            if pipeline[4]:  # one more grid frame than the segment's latent frames
                assert (frames - 1) // factor + 2 == variant.reference_latent_frames
                continue
        elif config:
            defaults = inspect.signature(getattr(diffusers, family.classes[0]).__init__).parameters
            assert defaults[config[1]].default == int(config[2])
            frames = int(config[2]) if config[3] == "video" else (int(config[2]) - 1) * factor + 1
        elif modular := re.fullmatch(r"(\w+) max_duration=(\d+) s at (\d+) fps: (\d+) frames", variant.source):
            pipeline = getattr(diffusers, modular[1])  # constants behind the modular pipeline's properties
            seconds, fps = pipeline.max_duration.fget(None), pipeline.fps.fget(None)
            assert (seconds, fps) == (int(modular[2]), int(modular[3]))
            chunk, latents = family.vae_chunk  # the longest video its VAE encodes within that duration
            assert int(modular[4]) == (seconds * fps - latents) // chunk * chunk + latents
            assert family.model_family().latent_frames(int(modular[4])) == variant.reference_latent_frames
            assert family.model_family().reference_video_frames == int(modular[4])
            continue
        else:
            release = re.fullmatch(r"the .* release's (\d+) frames .*", variant.source)
            assert release, variant.source
            frames = int(release[1])
        assert (frames - 1) // factor + 1 == variant.reference_latent_frames
    for name in family.pipelines:
        pipeline = getattr(diffusers, name)
        if issubclass(pipeline, diffusers.ModularPipeline):  # its blocks name the transformer they load
            blocks = getattr(diffusers.modular_pipelines, pipeline.default_blocks_name)()
            hints = {getattr(c.type_hint, "__name__", None) for c in blocks.expected_components}
            assert set(family.classes) <= hints, (name, hints)
            continue
        parameters = inspect.signature(pipeline.__init__).parameters
        if "transformer" not in parameters:  # diffusers' placeholder for a pipeline whose extra is not installed
            assert hasattr(pipeline, "_backends"), name
            continue
        annotation = str(parameters["transformer"].annotation)
        assert any(cls in annotation for cls in family.classes), (name, annotation)


def test_every_diffusers_video_transformer_is_supported_or_refused():
    video = {n for n in dir(diffusers) if n.endswith("Transformer3DModel")}
    known = {c for f in DECLARED for c in f.classes} | set(ADAPTER_MODULES) | {c for r in REFUSED for c in r.classes}
    assert video <= known, sorted(video - known)


@pytest.mark.parametrize("refusal", REFUSED, ids=lambda r: r.classes[0])
def test_a_refused_class_is_refused_with_its_reason(refusal):
    cls = getattr(diffusers, refusal.classes[0])
    model = cls.__new__(cls)  # the refusal is decided from the class alone, before any weight is read
    with pytest.raises(ConfigError, match=re.escape(refusal.reason)):
        lvsa.apply(model)


def test_a_refused_variant_is_refused_with_its_reason(saved):
    model = load(saved, "kandinsky-5")
    model.register_to_config(attention_type="nabla")  # a NABLA checkpoint's config
    with pytest.raises(ConfigError, match=r"^lvsa does not run Kandinsky5Transformer3DModel as Kandinsky 5.0 Video "
                                          r"with NABLA attention: the checkpoint runs its own NABLA"):
        lvsa.apply(model)
    assert not any(type(m.processor).__module__.startswith("lvsa") for m in model.modules() if hasattr(m, "processor"))
    assert "Kandinsky 5.0 Video with NABLA attention: refused, the checkpoint runs" in text_table()


def test_a_chunked_vae_counts_latent_frames_as_its_pipeline_does():
    """MiniMax-H3's VAE encodes 17n + 5 frames into 5n + 2 latent frames; its pipeline rounds other counts up."""
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import align_num_frames, video_latent_num_frames

    family = FAMILY_OF["minimax-h3"].model_family()
    for frames in range(5, 700):
        aligned = align_num_frames(frames, 17, 5)
        assert family.latent_frames(frames) == video_latent_num_frames(aligned, 17, 5), frames
    assert family.reference_video_frames == 345 and family.latent_frames(345) == 102


def test_a_packed_sequence_whose_video_rows_are_no_grid_is_refused(saved):
    """MiniMax-H3's grid is read off its layout's values: a layout whose trailing video rows are not frames of
    one (h, w) layout with rising time is an error naming the problem, never a guessed grid."""
    model = load(saved, "minimax-h3")
    kwargs = _minimax_h3(model, 5, 1, torch.Generator().manual_seed(0))
    adapter = adapter_for(model)
    assert adapter.grid_of_call(model, (), kwargs) == lvsa.geometry.LatentGrid(5, 16)
    for problem, change in [
        ("not one value per frame, rising", lambda p: p[-16:, 0].fill_(p[-17, 0])),  # two frames at one time
        ("do not share one (h, w) layout", lambda p: p[-1, 1].add_(1.0)),
        ("80 video rows are not whole frames of 12 rows", lambda p: p[-68:-64, 0].add_(0.5)),
    ]:
        positions = kwargs["position_ids"].clone()
        change(positions)
        with pytest.raises(ConfigError, match=re.escape(problem)):
            adapter.grid_of_call(model, (), {**kwargs, "position_ids": positions})
    video = kwargs["video_indices"][:-3]  # the last rows are no video rows
    with pytest.raises(ConfigError, match="no video row ends the sequence"):
        adapter.grid_of_call(model, (), {**kwargs, "video_indices": video})
    with pytest.raises(ConfigError, match="called without position_ids and video_indices"):
        adapter.grid_of_call(model, (), {k: v for k, v in kwargs.items() if k != "position_ids"})


def test_a_processor_that_does_not_reach_dispatch_is_refused(saved):
    model = load(saved, "wan-vace")

    class Own:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    model.blocks[0].attn1.set_processor(Own())
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn1: its processor .*Own\.__call__ does not call "
                                          r"dispatch_attention_fn"):
        lvsa.apply(model)


def test_the_readme_table_and_lvsa_models_agree_with_the_declarations():
    from lvsa.models_table import markdown_table

    table = markdown_table()
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README's model table is out of date: paste `lvsa models --markdown`"
    exe = Path(sys.executable).parent / "lvsa"
    printed = subprocess.run([str(exe), "models", "--markdown"], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == table.strip()
    for family in DECLARED:
        assert family.name in table and all(cls in table for cls in family.classes)
    for refusal in REFUSED:
        assert refusal.reason in table


def test_declared_adapters_are_model_adapters():
    for family in DECLARED:
        assert isinstance(lvsa.adapters.adapters()[family.name], DeclaredAdapter)


# -- the families' pipelines ------------------------------------------------------------------------------
_PIPELINE_TINY = {**_WAN_TINY, "in_channels": 16, "out_channels": 16, "text_dim": 32}


def _wan_image_pipeline(name, transformer_class, **extra):
    """A pipeline of Wan's backbone conditioned on an image: a small CLIP image encoder, and the transformer's
    input holding the latent, the image's latent and a 4-channel mask (36 channels)."""
    import transformers

    image_encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8))
    transformer = getattr(diffusers, transformer_class)(**{**_PIPELINE_TINY, "in_channels": 36}, image_dim=16,
                                                        **extra)
    return getattr(diffusers, name)(
        tokenizer=None, text_encoder=None, image_encoder=image_encoder, transformer=transformer, vae=small_wan_vae(),
        image_processor=transformers.CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
        scheduler=diffusers.UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True,
                                                    prediction_type="flow_prediction"))


def _chronoedit():
    return _wan_image_pipeline("ChronoEditPipeline", "ChronoEditTransformer3DModel", added_kv_proj_dim=32)


def _chronoedit_inputs(g):  # the image to edit; its video of temporal reasoning is the grid lvsa plans
    return {**random_prompt_embeddings(g), "image": _image(), "enable_temporal_reasoning": True}


def _skyreels_i2v():
    return _wan_image_pipeline("SkyReelsV2ImageToVideoPipeline", "SkyReelsV2Transformer3DModel",
                               added_kv_proj_dim=32)


def _wan_animate():
    return _wan_image_pipeline(
        "WanAnimatePipeline", "WanAnimateTransformer3DModel", latent_channels=16, motion_encoder_size=16,
        motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1, motion_encoder_batch_size=2)


def _kandinsky5_i2v():  # visual_cond: the image's latent and a mask channel beside the latent
    components = dict(example_model("kandinsky-5").tiny_pipeline().components)
    components["transformer"] = diffusers.Kandinsky5Transformer3DModel(**{**KANDINSKY5_TINY, "visual_cond": True})
    return diffusers.Kandinsky5I2VPipeline(**components)


def _motif_i2v():
    components = example_model("motif-video").tiny_pipeline().components
    return diffusers.MotifVideoImage2VideoPipeline(**components)


def _consisid_pipeline():
    """ConsisID on CogVideoX's small VAE, its face branch small: the perceiver's key width is two thirds of the
    model's (64 of 96), which the face extractor's output must match."""
    transformer = diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=48, in_channels=8, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, max_text_seq_length=6,
        use_rotary_positional_embeddings=True, is_train_face=True, cross_attn_interval=1, cross_attn_dim_head=8,
        cross_attn_num_heads=2, LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2,
        LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=64, LFE_ff_mult=1, LFE_num_scale=5)
    components = example_model("cogvideox").tiny_pipeline().components
    return diffusers.ConsisIDPipeline(tokenizer=None, text_encoder=None, vae=components["vae"],
                                      transformer=transformer, scheduler=diffusers.CogVideoXDPMScheduler())


def _consisid_inputs(g):
    """The face as its encoders would give it (an identity embedding and five ViT feature levels); without
    keypoints (``is_kps`` False), the image's latent frame is the conditioning beside the latent."""
    return {"prompt_embeds": _randn(g, 1, 6, 16), "negative_prompt_embeds": _randn(g, 1, 6, 16),
            "id_cond": _randn(g, 1, 16), "id_vit_hidden": [_randn(g, 1, 5, 16) for _ in range(5)],
            "image": _image()}


def _wan_animate_length(frames):
    """One segment whose grid (the reference image's latent frame, then the segment's) spans ``frames`` video
    frames: a pose and a face video of ``frames - 4`` frames."""
    from PIL import Image

    segment = frames - 4
    return {"segment_frame_length": segment, "image": _image(),
            "pose_video": [Image.new("RGB", (32, 32), (10, 200, 40))] * segment,
            "face_video": [Image.new("RGB", (16, 16), (200, 160, 120))] * segment}


class StandInGuardrail:
    """In place of NVIDIA's Cosmos guardrail, which the Cosmos pipelines require and which cannot be installed
    with its weights here: it passes every prompt and video (a Cosmos run of lvsa elsewhere uses the real one;
    these tests call with embeddings and keep the latents, so only ``to`` is ever called)."""

    def to(self, *_args, **_kwargs):
        return self

    def check_text_safety(self, _prompt):
        return True

    def check_video_safety(self, video):
        return video


def _cosmos2():
    transformer = diffusers.CosmosTransformer3DModel(  # the latent and its conditioning mask channel
        in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(64, 16, 16), concat_padding_mask=False,
        extra_pos_embed_type=None, rope_scale=(1.0, 4.0, 4.0))
    return diffusers.Cosmos2VideoToWorldPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=small_wan_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=StandInGuardrail())


def _cosmos2_5():
    """Cosmos Predict 2.5 on the small Predict 2 transformer and Wan VAE, with its UniPC scheduler."""
    components = {k: v for k, v in _cosmos2().components.items() if k != "scheduler"}
    return diffusers.Cosmos2_5_PredictBasePipeline(
        **components, scheduler=diffusers.UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True,
                                                                  prediction_type="flow_prediction"))


def _cosmos1(pipeline="CosmosTextToWorldPipeline"):
    """Cosmos 1.0's text-to-world or video-to-world pipeline: its 8 x 8 x 8 VAE (small), its EDM scheduler and its
    learnable position embedding (video-to-world: a conditioning mask channel). Without the padding-mask channel
    its checkpoints concatenate (``concat_padding_mask``): diffusers resizes that mask through torchvision, which
    the tests do not install."""
    transformer = diffusers.CosmosTransformer3DModel(
        in_channels=17 if pipeline == "CosmosVideoToWorldPipeline" else 16, out_channels=16, num_attention_heads=2,
        attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(64, 16, 16), concat_padding_mask=False,
        extra_pos_embed_type="learnable", rope_scale=(2.0, 1.0, 1.0))
    # without the released latent statistics, which cover 16 latent frames: with them the pipelines encode and
    # decode no longer video (the family's notes say so)
    vae = diffusers.AutoencoderKLCosmos(encoder_block_out_channels=(8, 8, 8, 8), decode_block_out_channels=(8, 8, 8, 8),
                                        num_layers=1, attention_resolutions=(), resolution=64, latents_mean=None,
                                        latents_std=None)
    scheduler = diffusers.EDMEulerScheduler(sigma_max=80.0, sigma_min=0.002, sigma_data=0.5, sigma_schedule="karras",
                                            prediction_type="epsilon", rho=7.0, final_sigmas_type="sigma_min")
    return getattr(diffusers, pipeline)(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                        scheduler=scheduler, safety_checker=StandInGuardrail())


def _cosmos2_inputs(g):  # the first frame to continue: Video2World conditions its latent frame per timestep
    return {**random_prompt_embeddings(g), "image": _image()}


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (100, 20, 50))


def _diffusion_forcing(name):
    return WanBackboneExample(name, "SkyReelsV2Transformer3DModel", 193, 97).tiny_pipeline()


def _video(frames=17):
    """A video to extend: frames of changing colour."""
    from PIL import Image

    return [Image.new("RGB", (32, 32), (10 * i, 200 - 10 * i, 50)) for i in range(frames)]


def _ltx_i2v():
    return diffusers.LTXImageToVideoPipeline(**example_model("ltx-video").tiny_pipeline().components)


def _ltx_condition():
    return diffusers.LTXConditionPipeline(**example_model("ltx-video").tiny_pipeline().components)


def _ltx2_i2v():
    """The example's LTX-2 pipeline, its VAE encoding as its decoder decodes (4x time, 4x space: the example's
    small VAE only decodes, and its encoder's default blocks scale space, then time)."""
    components = dict(example_model("ltx-2").tiny_pipeline().components)
    config = {k: v for k, v in components["vae"].config.items() if not k.startswith("_")}
    components["vae"] = diffusers.AutoencoderKLLTX2Video(
        **{**config, "downsample_type": ("spatiotemporal", "spatiotemporal", "spatial", "spatial")})
    return diffusers.LTX2ImageToVideoPipeline(**components)


def _hunyuan_skyreels_i2v():
    """SkyReels' HunyuanVideo I2V: the image's latent beside the latent as channels (8 in)."""
    components = dict(example_model("hunyuan-video").tiny_pipeline().components)
    components["transformer"] = diffusers.HunyuanVideoTransformer3DModel(
        **{**{k: v for k, v in components["transformer"].config.items() if not k.startswith("_")},
           "in_channels": 8})
    return diffusers.HunyuanSkyreelsImageToVideoPipeline(**components)


def _hunyuan_skyreels_inputs(g):
    """A padded prompt and a negative one padded alike (true CFG: two forwards a step), and the image."""
    prompt = example_model("hunyuan-video").embeddings(g)
    negative = example_model("hunyuan-video").embeddings(g)
    return {**prompt, **{f"negative_{k}": v for k, v in negative.items()}, "image": _image()}


def _kandinsky6_ti2va():
    """Kandinsky 6 with the token types of its image-to-video checkpoints, the HunyuanVideo VAE (small), no
    audio VAE (the pipeline then runs without sound)."""
    config = {**next(row for row in ROWS if row.family == "kandinsky-6").config, "visual_token_type_num_embeddings": 2}
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                              norm_num_groups=4, mid_block_add_attention=False)
    return diffusers.Kandinsky6TI2VAPipeline(
        transformer=diffusers.Kandinsky6Transformer3DModel(**config), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _kandinsky6_inputs(g):
    embeddings = {f"{prefix}{name}": torch.randn(*shape, generator=g) for prefix in ("", "negative_")
                  for name, shape in (("prompt_embeds", (1, 8, 16)), ("pooled_prompt_embeds", (1, 8)))}
    return {**embeddings, "image": _image()}


def _ltx2_like(name):
    """An LTX-2 pipeline on the image-to-video pipeline's components (its VAE encodes)."""
    parameters = inspect.signature(getattr(diffusers, name).__init__).parameters
    return getattr(diffusers, name)(**{k: v for k, v in _ltx2_i2v().components.items() if k in parameters})


def _ltx2_conditions(index):
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    return [LTX2VideoCondition(frames=_image(), index=index, crf=0)]  # crf=0: no H.264 re-compression (PyAV)


def _hunyuan_video_i2v():
    """HunyuanVideo I2V with its image's latent frame replacing the first frame's tokens (token_replace)."""
    components = dict(example_model("hunyuan-video").tiny_pipeline().components)
    components["transformer"] = diffusers.HunyuanVideoTransformer3DModel(
        **{**{k: v for k, v in components["transformer"].config.items() if not k.startswith("_")},
           "image_condition_type": "token_replace"})
    return diffusers.HunyuanVideoImageToVideoPipeline(**components, image_processor=None)


@dataclass
class PipelineCase:
    """A family's pipeline, small and with random weights (no text encoder: the prompts come as embeddings):
    the example application's (``lvsa_app.models``), or one of the same kind built here for a pipeline that
    example application does not run (an image to edit or animate)."""

    example: ExampleModel
    #: layer calls per self-attention layer and step: 1 where CFG is batched (or the guidance embedded), 2 where
    #: the two halves are separate forwards or the model attends one sample at a time
    calls: int
    #: the key padding mask each call beyond the horizon must hold (a padded prompt's text keys)
    padding: list[list[bool]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: plans per step beyond the horizon: one per geometry, and a geometry counts its text tokens
    plans_per_step: int = 1
    #: layer calls per step that the model's processor skips by design (LTX-2's guidance pass in its STG blocks)
    skipped: int = 0
    #: the arguments that make the pipeline generate ``frames`` video frames
    length: Callable[[int], dict[str, Any]] = lambda frames: {"num_frames": frames}
    #: components from_pretrained is given (those saved as absent that the pipeline cannot run without)
    components: Callable[[], dict[str, Any]] = dict

    @property
    def vae_temporal(self) -> int:
        """Video frames per latent frame of the small VAE, which lvsa must read off the pipeline."""
        return getattr(self.example, "tiny_vae_temporal", 4)  # Wan's VAE


PIPELINES = {
    "WanVACEPipeline": PipelineCase(example_model("wan-vace"), 2),
    "SkyReelsV2Pipeline": PipelineCase(example_model("skyreels-v2"), 2),
    "SkyReelsV2DiffusionForcingPipeline": PipelineCase(
        WanBackboneExample("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2Transformer3DModel", 193, 97), 2),
    # diffusion forcing conditioned on the image's latent frame, or on the last 17 frames of a video to extend
    # (five latent frames): they open the grid at the timestep of a clean frame
    "SkyReelsV2DiffusionForcingImageToVideoPipeline": PipelineCase(
        DeclaredExample("skyreels-v2", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
                        lambda: _diffusion_forcing("SkyReelsV2DiffusionForcingImageToVideoPipeline"),
                        lambda g: {**random_prompt_embeddings(g), "prompt": None, "image": _image()}), 2),
    "SkyReelsV2DiffusionForcingVideoToVideoPipeline": PipelineCase(
        DeclaredExample("skyreels-v2", "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
                        lambda: _diffusion_forcing("SkyReelsV2DiffusionForcingVideoToVideoPipeline"),
                        lambda g: {**random_prompt_embeddings(g), "prompt": None, "video": _video()}), 2,
        extra={"overlap_history": 17}),
    "LTXPipeline": PipelineCase(example_model("ltx-video"), 1),
    "HunyuanVideoPipeline": PipelineCase(example_model("hunyuan-video"), 1, padding=[[True] * 6 + [False] * 2]),
    "Kandinsky5T2VPipeline": PipelineCase(example_model("kandinsky-5"), 2),
    # batched CFG, but the model attends each sample with its own prompt's valid tokens (6 and 8: two plans)
    "MochiPipeline": PipelineCase(example_model("mochi"), 2, plans_per_step=2),
    "AllegroPipeline": PipelineCase(example_model("allegro"), 1),
    "EasyAnimatePipeline": PipelineCase(example_model("easyanimate"), 1),
    "MotifVideoPipeline": PipelineCase(example_model("motif-video"), 2),
    "AnyFlowPipeline": PipelineCase(example_model("anyflow"), 1),
    "ChronoEditPipeline": PipelineCase(DeclaredExample("chronoedit", "ChronoEditPipeline", _chronoedit,
                                                       _chronoedit_inputs), 2,
                                       extra={"num_temporal_reasoning_steps": 3}),
    # image to video: the image's latent frame is the grid's first (LTX: a timestep per token, the image's 0)
    "LTXImageToVideoPipeline": PipelineCase(
        DeclaredExample("ltx-video", "LTXImageToVideoPipeline", _ltx_i2v,
                        lambda g: {**example_model("ltx-video").embeddings(g), "image": _image()}), 1),
    # conditioned on an image at frame 0 (the grid's first latent frame): the forward is given the tokens'
    # coordinates (video_coords), not the grid's sizes
    "LTXConditionPipeline": PipelineCase(
        DeclaredExample("ltx-video", "LTXConditionPipeline", _ltx_condition,
                        lambda g: {**example_model("ltx-video").embeddings(g), "image": _image(), "frame_index": 0}),
        1),
    "HunyuanVideoImageToVideoPipeline": PipelineCase(
        DeclaredExample("hunyuan-video", "HunyuanVideoImageToVideoPipeline", _hunyuan_video_i2v,
                        lambda g: {**example_model("hunyuan-video").embeddings(g), "image": _image()}), 1,
        padding=[[True] * 6 + [False] * 2]),
    "HunyuanSkyreelsImageToVideoPipeline": PipelineCase(
        DeclaredExample("hunyuan-video", "HunyuanSkyreelsImageToVideoPipeline", _hunyuan_skyreels_i2v,
                        _hunyuan_skyreels_inputs), 2, padding=[[True] * 6 + [False] * 2],
        extra={"true_cfg_scale": 6.0}),
    "SkyReelsV2ImageToVideoPipeline": PipelineCase(
        DeclaredExample("skyreels-v2", "SkyReelsV2ImageToVideoPipeline", _skyreels_i2v,
                        lambda g: {**random_prompt_embeddings(g), "image": _image()}), 2),
    "Kandinsky5I2VPipeline": PipelineCase(
        DeclaredExample("kandinsky-5", "Kandinsky5I2VPipeline", _kandinsky5_i2v,
                        lambda g: {**example_model("kandinsky-5").embeddings(g), "image": _image()}), 2),
    "MotifVideoImage2VideoPipeline": PipelineCase(  # its prompt is positional: None with embeddings
        DeclaredExample("motif-video", "MotifVideoImage2VideoPipeline", _motif_i2v,
                        lambda g: {**example_model("motif-video").embeddings(g), "image": _image(), "prompt": None},
                        guider=True), 2),
    "Cosmos2VideoToWorldPipeline": PipelineCase(DeclaredExample("cosmos", "Cosmos2VideoToWorldPipeline", _cosmos2,
                                                                _cosmos2_inputs), 2,
                                                components=lambda: {"safety_checker": StandInGuardrail()}),
    # Predict 2.5's text-to-world (its image and video modes convert their input through torchvision, not
    # installed here)
    "Cosmos2_5_PredictBasePipeline": PipelineCase(
        DeclaredExample("cosmos", "Cosmos2_5_PredictBasePipeline", _cosmos2_5, random_prompt_embeddings), 2,
        components=lambda: {"safety_checker": StandInGuardrail()}),
    # Cosmos 1.0: two forwards a step (the unconditional one after the conditional); video-to-world conditions on
    # an image's latent frame
    "CosmosTextToWorldPipeline": PipelineCase(
        DeclaredExample("cosmos", "CosmosTextToWorldPipeline", _cosmos1, random_prompt_embeddings, tiny_vae_temporal=8),
        2, components=lambda: {"safety_checker": StandInGuardrail()}),
    "CosmosVideoToWorldPipeline": PipelineCase(
        DeclaredExample("cosmos", "CosmosVideoToWorldPipeline", lambda: _cosmos1("CosmosVideoToWorldPipeline"),
                        _cosmos2_inputs, tiny_vae_temporal=8),
        2, components=lambda: {"safety_checker": StandInGuardrail()}),
    # the face's identity tokens enter by cross-attention after each block; the image's latent frame is a
    # channel beside the latent, so the grid is the video's
    "ConsisIDPipeline": PipelineCase(DeclaredExample("consisid", "ConsisIDPipeline", _consisid_pipeline,
                                                     _consisid_inputs), 1),
    "WanAnimatePipeline": PipelineCase(DeclaredExample("wan-animate", "WanAnimatePipeline", _wan_animate,
                                                       random_prompt_embeddings), 2, length=_wan_animate_length),
    # three passes a step: CFG batched, spatio-temporal guidance (its block, the second, skips attention), and
    # the modalities isolated
    "LTX2Pipeline": PipelineCase(example_model("ltx-2"), 3, skipped=1,
                                 extra={"spatio_temporal_guidance_blocks": [1]}),
    # its image's latent frame is the grid's first, held at timestep 0 by a per-token timestep
    "LTX2ImageToVideoPipeline": PipelineCase(
        DeclaredExample("ltx-2", "LTX2ImageToVideoPipeline", _ltx2_i2v,
                        lambda g: {**example_model("ltx-2").embeddings(g), "image": _image()}), 3, skipped=1,
        # image_crf=0: no H.264 re-compression of the image (PyAV), which touches only its pixels
        extra={"spatio_temporal_guidance_blocks": [1], "image_crf": 0}),
    # the image's latent is a frame appended after the video (its token type 1): other tokens after the grid
    "Kandinsky6TI2VAPipeline": PipelineCase(
        DeclaredExample("kandinsky-6", "Kandinsky6TI2VAPipeline", _kandinsky6_ti2va, _kandinsky6_inputs), 2,
        extra={"sample_audio": False}),
    # without reference videos (their tokens join the sequence: refused), text to video
    "LTX2InContextPipeline": PipelineCase(
        DeclaredExample("ltx-2", "LTX2InContextPipeline", lambda: _ltx2_like("LTX2InContextPipeline"),
                        example_model("ltx-2").embeddings), 3, skipped=1,
        extra={"spatio_temporal_guidance_blocks": [1]}),
    # an image condition at index 0 replaces the grid's first latent frame
    "LTX2ConditionPipeline": PipelineCase(
        DeclaredExample("ltx-2", "LTX2ConditionPipeline", lambda: _ltx2_like("LTX2ConditionPipeline"),
                        lambda g: {**example_model("ltx-2").embeddings(g), "conditions": _ltx2_conditions(0)}),
        3, skipped=1, extra={"spatio_temporal_guidance_blocks": [1]}),
}


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    """Small random-weight pipelines (no text encoder), saved with save_pretrained."""
    folders = {}
    for name, case in PIPELINES.items():
        torch.manual_seed(0)
        folders[name] = tmp_path_factory.mktemp(name)
        pipe = case.example.tiny_pipeline()
        assert type(pipe).__name__ == name
        pipe.save_pretrained(folders[name])
    return folders


def generate(pipe, frames, **extra):
    """The pipeline's latents for ``frames`` video frames in three steps (``extra`` overrides the case's)."""
    case = PIPELINES[type(pipe).__name__]
    arguments = {**case.example.pipeline_inputs(pipe, None, 0), **case.example.call_arguments(pipe, 5.0),
                 **case.length(frames), "height": 32, "width": 32, "num_inference_steps": 3,
                 "generator": torch.Generator().manual_seed(0), "output_type": "latent", **case.extra, **extra}
    with torch.inference_mode():
        return pipe(**arguments).frames


def load_pipeline(saved_pipelines, name):
    # the components saved as absent (no text encoder) are passed as None, as diffusers asks
    import json

    index = json.loads((saved_pipelines[name] / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = diffusers.DiffusionPipeline.from_pretrained(saved_pipelines[name],
                                                       **{**absent, **PIPELINES[name].components()})
    assert type(pipe).__name__ == name
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_reference(plan, video, text, padding, out, tolerance=2e-5, references=None):
    """A layer call's output equals the float64 reference under its plan's mask (its text placed as declared;
    frame-paired reference keys as the model's mask pairs them)."""
    video_out, text_out = out
    if references is not None:
        assert text is None
        torch.testing.assert_close(video_out.double(), reference_with_frame_references(*video, plan, references),
                                   rtol=tolerance, atol=tolerance)
        return
    if text is None:
        q, k, v = video
        got = video_out
    else:
        after = plan.text_position == "after"
        q, k, v = (torch.cat([a, b] if after else [b, a], dim=1) for a, b in zip(video, text, strict=True))
        got = torch.cat([video_out, text_out] if after else [text_out, video_out], dim=1)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, plan, padding), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipelines_equal_the_model_at_the_horizon_and_rotate_beyond_it(saved_pipelines, name, layer_calls):
    pipe = load_pipeline(saved_pipelines, name)
    case = PIPELINES[name]
    reference, factor = horizon(pipe.transformer), case.vae_temporal
    at, beyond = (reference - 1) * factor + 1, (2 * reference - 1) * factor + 1
    extra = {"base_num_frames": beyond} if "DiffusionForcing" in name else {}  # one pass over the long video
    dense = generate(pipe, at)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    assert torch.equal(generate(pipe, at), dense)
    layers = len(handle.layers)
    # read off the pipeline (LTX, EasyAnimate: vae_temporal_compression_ratio; Mochi: vae_temporal_scale_factor),
    # not the family's default (LTX's small VAE has 4 frames per latent, the family's 8)
    assert handle.runtime.vae_temporal_factor == factor
    per_step = case.calls * layers - case.skipped
    assert handle.stats.calls_by_step == {s: [0, per_step] for s in range(3)}
    calls = layer_calls
    calls.clear()  # only the run beyond the horizon
    handle.stats.plan_builds = 0
    generate(pipe, beyond, **extra)
    # the keyframes rotate: new plans every step
    assert handle.stats.plan_builds == 3 * case.plans_per_step and handle.stats.fallback_calls == 0
    assert [call[0] for call in calls] == [s for s in range(3) for _ in range(per_step)]
    for _step, _origin, plan, video, text, padding, out in calls:
        assert plan.kfi > 1 and plan.latent_frames == 2 * reference
        if case.padding is not None:
            assert padding.tolist() == case.padding
        assert_reference(plan, video, text, padding, out)


def test_a_declared_transformer_shared_by_two_pipelines_keeps_one_installation(saved_pipelines, layer_calls):
    """LTX-2's text-to-video and image-to-video pipelines on one transformer (as a user loads them): the same
    settings share lvsa's installation and the second pipeline runs sparse; other settings are refused, naming
    the pipeline they would change behind its back, and change nothing."""
    first = load_pipeline(saved_pipelines, "LTX2Pipeline")
    second = load_pipeline(saved_pipelines, "LTX2ImageToVideoPipeline")
    second.transformer = first.transformer
    handle = lvsa.apply(first, lvsa.LVSASettings(fallback="error"))
    assert lvsa.apply(second, lvsa.LVSASettings(fallback="error")) is handle
    reference = horizon(first.transformer)
    generate(second, (2 * reference - 1) * PIPELINES["LTX2ImageToVideoPipeline"].vae_temporal + 1)
    assert handle.stats.sparse_calls > 0 and handle.stats.fallback_calls == 0 and layer_calls
    calls = len(layer_calls)
    with pytest.raises(ConfigError, match=r"shares modules with transformer of LTX2ImageToVideoPipeline; applying "
                                          r"here with other settings would change the settings of LTX2Pipeline"):
        lvsa.apply(second, lvsa.LVSASettings(fallback="error", sparsity_scale=0.5))
    assert lvsa.handle_of(first) is handle and handle.runtime.settings.sparsity_scale == 1.0
    generate(first, (2 * reference - 1) * PIPELINES["LTX2Pipeline"].vae_temporal + 1)
    assert len(layer_calls) > calls and all(plan.kfi > 1 for _s, _o, plan, *_ in layer_calls)
    lvsa.remove(first)
    assert lvsa.apply(second, lvsa.LVSASettings(fallback="error", sparsity_scale=0.5)) is not handle


@pytest.mark.parametrize("fallback", ["error", "warn"])
def test_a_declared_layer_whose_processor_is_replaced_after_apply_is_noticed(saved, fallback, caplog):
    """A user's processor set on one self-attention layer after ``apply`` never runs as if lvsa were there:
    one error, or the loud line and the user's processor."""
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor

    model = load(saved, "ltx-2")
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback=fallback))
    model.transformer_blocks[1].attn1.set_processor(LTX2AudioVideoAttnProcessor())
    frames = 2 * horizon(model) + 1
    caplog.set_level(logging.WARNING, logger="lvsa")
    if fallback == "error":
        with pytest.raises(ConfigError, match=r"processor_replaced.*transformer_blocks\.1\.attn1"):
            run(model, frames)
        return
    run(model, frames)
    assert "[LVSA-FALLBACK]" in caplog.text and "transformer_blocks.1.attn1" in caplog.text
    assert handle.stats.fallback_reasons["processor_replaced"] > 0 and handle.stats.sparse_calls > 0


def test_a_grid_that_changes_within_a_run_is_planned_anew(saved_pipelines, layer_calls):
    """ChronoEdit reasons over a long video for its first steps, then keeps only its first and last frames:
    the step after the cut is planned on the two-frame grid."""
    pipe = load_pipeline(saved_pipelines, "ChronoEditPipeline")
    reference = horizon(pipe.transformer)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    generate(pipe, (2 * reference - 1) * 4 + 1, num_temporal_reasoning_steps=2)
    frames = {step: {call[2].latent_frames for call in layer_calls if call[0] == step} for step in range(3)}
    assert frames == {0: {2 * reference}, 1: {2 * reference}, 2: {2}}
    assert handle.stats.fallback_calls == 0
    for _step, _origin, plan, video, text, padding, out in layer_calls:
        assert_reference(plan, video, text, padding, out)


# MiniMax-H3 runs through diffusers' modular pipeline only; its core denoising blocks take the prompt's
# embedding and (fl2va) the encoded keyframes, so they run here without its Qwen3-VL conditioner and VAEs
CP_WORKER = Path(__file__).with_name("families_cp_worker.py")
CP_PIPELINE_WORKER = Path(__file__).with_name("families_cp_pipeline_worker.py")
_MINIMAX_PIPELINE_TINY = {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "num_layers": 2,
                          "num_refiner_layers": 1, "ffn_dim": 32, "in_channels": 24, "audio_in_channels": 32,
                          "text_dim": 16, "freq_dim": 16, "time_embed_hidden_dim": 32, "time_embed_dim": 16,
                          "rope_freq_dim": 2}  # the pipeline's latent channels without a VAE: 24 video, 32 audio


def _minimax_pipeline(blocks, folder):
    from diffusers import MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel

    torch.manual_seed(0)
    MiniMaxH3Transformer3DModel(**_MINIMAX_PIPELINE_TINY).save_pretrained(folder)
    pipe = blocks().init_pipeline()
    pipe.update_components(transformer=MiniMaxH3Transformer3DModel.from_pretrained(folder).eval(),
                           scheduler=MiniMaxH3Scheduler(shift=12.0), audio_scheduler=MiniMaxH3Scheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _minimax_generate(pipe, **extra):
    """345 frames (14.4 s, 102 latent frames, its horizon) at 64 x 64 in three steps."""
    with torch.inference_mode():
        return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0)),
                    text_token_tags=torch.ones(6, dtype=torch.long), height=64, width=64, num_frames=345,
                    num_inference_steps=3, generator=torch.Generator().manual_seed(1), output="latents", **extra)


@pytest.mark.parametrize("workflow", ["t2va", "fl2va"])
def test_minimax_h3_modular_pipeline_equals_the_model_at_the_horizon_and_rotates_beyond_it(tmp_path, workflow,
                                                                                          layer_calls):
    """The modular pipeline's own layout, timestep table (video, soundtrack and keyframe rows each on their own
    schedule) and loop. Its pipeline stops at 15 s, the horizon, so the run beyond it asks for a shorter one."""
    from diffusers.modular_pipelines.minimax_h3 import modular_blocks_minimax_h3 as blocks

    if workflow == "t2va":
        pipe, extra, other = _minimax_pipeline(blocks.MiniMaxH3CoreDenoiseStep, tmp_path), {}, 6 + 2 * 575
    else:  # a first-frame keyframe, its encoded latent given (random: no VAE here)
        pipe = _minimax_pipeline(blocks.MiniMaxH3FL2VACoreDenoiseStep, tmp_path)
        extra = {"keyframe_anchors": ("first",), "condition_latents": [torch.randn(1, 24, 1, 4, 4)]}
        other = 6 + 4 + 2 * 575  # text, the keyframe's rows, the soundtrack's
    dense = _minimax_generate(pipe, **extra)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    assert torch.equal(_minimax_generate(pipe, **extra), dense)
    assert handle.stats.sparse_calls == handle.stats.steps * 2 and handle.stats.fallback_calls == 0
    layer_calls.clear()
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error", reference_latent_frames=51))
    _minimax_generate(pipe, **extra)
    steps = handle.stats.steps
    assert steps >= 2 and handle.stats.calls_by_step == {s: [0, 2] for s in range(steps)}
    assert handle.stats.plan_builds == steps  # the rising clock counts steps: the keyframes rotate
    assert [call[0] for call in layer_calls] == [s for s in range(steps) for _ in range(2)]
    for _step, _origin, plan, video, text, padding, out in layer_calls:
        assert plan.kfi > 1 and plan.latent_frames == 102 and plan.text_tokens == other
        assert_reference(plan, video, text, padding, out)


@pytest.mark.parametrize(("ulysses", "ring"), [(2, 1), (1, 2)], ids=["ulysses2-ring1", "ulysses1-ring2"])
@pytest.mark.parametrize("workflow", ["t2va", "fl2va"])
def test_minimax_h3_modular_pipeline_under_context_parallelism_equals_one_process(tmp_path, workflow, ulysses, ring,
                                                                                  torchrun):
    """Its modular pipeline beyond the horizon (the keyframes rotate), with context parallelism: only the video
    rows that end the packed sequence split; the text, the keyframe's and the soundtrack's rows stay whole."""
    from diffusers.modular_pipelines.minimax_h3 import modular_blocks_minimax_h3 as blocks

    core = blocks.MiniMaxH3CoreDenoiseStep if workflow == "t2va" else blocks.MiniMaxH3FL2VACoreDenoiseStep
    pipe = _minimax_pipeline(core, tmp_path / "model")
    extra = ({} if workflow == "t2va" else
             {"keyframe_anchors": ("first",), "condition_latents": [torch.randn(1, 24, 1, 4, 4)]})
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error", reference_latent_frames=51))
    one = _minimax_generate(pipe, **extra)
    handle.remove()
    kwargs = {"prompt_embeds": torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0)),
              "text_token_tags": torch.ones(6, dtype=torch.long), "height": 64, "width": 64, "num_frames": 345,
              "num_inference_steps": 3, **extra}
    torch.save(kwargs, tmp_path / "inputs.pt")
    result = torchrun(ulysses * ring, str(CP_PIPELINE_WORKER), str(tmp_path / "model"), workflow,
                      str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), str(ulysses), str(ring), "51",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["sparse_calls"] == handle.stats.sparse_calls > 0 and got["plan_builds"] == handle.stats.plan_builds
    def outputs(latents):  # the video's and the soundtrack's latents
        return list(latents) if isinstance(latents, (list, tuple)) else [latents]

    for parallel, single in zip(outputs(got["latents"]), outputs(one), strict=True):
        torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-4)


def test_a_condition_that_joins_the_sequence_apart_from_the_grid_is_refused(saved_pipelines):
    """LTXConditionPipeline puts a condition at a later frame_index before the video as extra tokens, at that
    frame's coordinates: not a grid lvsa plans, so one line names the model and why, before any layer runs."""
    pipe = load_pipeline(saved_pipelines, "LTXConditionPipeline")
    lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    frames = (2 * horizon(pipe.transformer) - 1) * 4 + 1
    with pytest.raises(ConfigError, match=r"^LTXVideoTransformer3DModel: its video_coords do not form a frame grid "
                                          r"\(their rotary time is not one value per frame, rising"):
        generate(pipe, frames, frame_index=8)


def _ltx2_references():
    from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition

    return [LTX2ReferenceCondition(frames=_video(9))]


_BESIDE_THE_GRID = {  # pipeline: (the call's conditioning, its sequence, the cause the refusal names)
    "LTX2ConditionPipeline": (lambda: {"conditions": _ltx2_conditions(8)}, 2112,
                              "LTX2ConditionPipeline appends keyframe tokens after the video for a condition past "
                              "index 0"),
    "LTX2InContextPipeline": (lambda: {"reference_conditions": _ltx2_references()}, 2240,
                              "LTX2InContextPipeline a reference video's tokens"),
}


@pytest.mark.parametrize("family", [f for f in DECLARED if f.refused_pipelines], ids=lambda f: f.name)
def test_a_refused_pipeline_is_refused_by_apply_before_any_work(family):
    """A pipeline the family declares refused (LTX-Video's long multi-prompt pipeline, whose windows append
    conditioning frames after their own) stops ``lvsa.apply`` with its reason, and nothing is installed."""
    assert family.refused_pipelines
    components = example_model(family.name).tiny_pipeline().components
    for name, why in family.refused_pipelines.items():
        cls = getattr(diffusers, name)
        pipe = cls(**{k: v for k, v in components.items() if k in inspect.signature(cls.__init__).parameters})
        processors = {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
        with pytest.raises(ConfigError, match=rf"^{name}: lvsa does not run this pipeline: {re.escape(why)}$"):
            lvsa.apply(pipe, lvsa.LVSASettings(fallback="warn"))
        assert lvsa.handle_of(pipe) is None
        assert {n: type(m.processor) for n, m in pipe.transformer.named_modules()
                if hasattr(m, "processor")} == processors


@pytest.mark.parametrize("fallback", ["error", "warn"])
@pytest.mark.parametrize("name", sorted(_BESIDE_THE_GRID))
def test_tokens_beside_the_grid_are_refused_naming_their_cause(saved_pipelines, name, fallback, caplog):
    """LTX-2's keyframes past index 0 and in-context reference videos join the sequence as tokens after the
    video: lvsa does not plan them, so the call is refused naming that cause, or (warn) runs the model's dense
    attention after the loud line."""
    conditioning, tokens, why = _BESIDE_THE_GRID[name]
    pipe = load_pipeline(saved_pipelines, name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback=fallback))
    frames = (2 * horizon(pipe.transformer) - 1) * 4 + 1
    cause = (rf"the sequence has {tokens} tokens, the grid 2048 video tokens, and ltx-2 declares no other tokens "
             rf"\(.*{re.escape(why)}")
    if fallback == "error":
        with pytest.raises(lvsa.GeometryError, match=rf"reason=geometry_detect seq_len={tokens}: " + cause):
            generate(pipe, frames, **conditioning())
        return
    caplog.set_level(logging.WARNING, logger="lvsa")
    generate(pipe, frames, **conditioning())
    assert re.search(r"\[LVSA-FALLBACK\] origin=transformer_blocks\.0\.attn1 reason=geometry_detect .*" + cause,
                     caplog.text)
    assert handle.stats.sparse_calls == 0 and handle.stats.fallback_calls > 0


def test_diffusion_forcing_extends_a_long_video_window_by_window(saved_pipelines, layer_calls):
    """SkyReels-V2's long-video loop: windows of ``base_num_frames``, each opening with the last 17 frames
    (five latent frames) of the one before. Each window is planned on its own grid, the keyframes rotate on
    every step of every window, and every call equals the reference."""
    pipe = load_pipeline(saved_pipelines, "SkyReelsV2DiffusionForcingPipeline")
    reference = horizon(pipe.transformer)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    latents = generate(pipe, (3 * reference - 1) * 4 + 1, base_num_frames=(2 * reference - 1) * 4 + 1,
                       overlap_history=17)
    assert latents.shape[2] == 3 * reference
    frames = {step: {call[2].latent_frames for call in layer_calls if call[0] == step} for step in range(6)}
    assert frames == {step: {2 * reference if step < 3 else reference + 5} for step in range(6)}
    assert handle.stats.plan_builds == 6 and handle.stats.fallback_calls == 0
    assert len({call[2].offset for call in layer_calls if call[0] < 3}) == 3
    for _step, _origin, plan, video, text, padding, out in layer_calls:
        assert plan.kfi > 1
        assert_reference(plan, video, text, padding, out)


def test_diffusion_forcing_with_causal_blocks_is_refused_loudly(saved_pipelines, caplog):
    pipe = load_pipeline(saved_pipelines, "SkyReelsV2DiffusionForcingPipeline")
    lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    with pytest.raises(lvsa.GeometryError, match=r"reason=attention_mask .*skyreels-v2 passed an attention mask"):
        generate(pipe, 97, causal_block_size=5, ar_step=2)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="warn"))
    caplog.set_level(logging.WARNING, logger="lvsa")
    generate(pipe, 97, causal_block_size=5, ar_step=2)
    assert "[LVSA-FALLBACK] origin=blocks.0.attn1 reason=attention_mask" in caplog.text
    assert handle.stats.fallback_calls > 0 and handle.stats.sparse_calls == 0


# -- context parallelism --------------------------------------------------------------------------------------

CP_LAYOUTS = [(2, 1), (1, 2)]  # Ulysses 2, ring 2


@pytest.mark.parametrize(("ulysses", "ring"), CP_LAYOUTS, ids=[f"ulysses{u}-ring{r}" for u, r in CP_LAYOUTS])
@pytest.mark.parametrize("family", sorted(f.name for f in DECLARED if f.context_parallel))
def test_context_parallel_equals_one_process(saved, family, ulysses, ring, tmp_path, torchrun):
    if ring > 1 and not FAMILY_OF[family].ring:
        model = load(saved, family)
        with pytest.raises(ConfigError, match="ring attention is not declared for"):
            lvsa.adapters.adapter_for(model).check_ring(model, ring)
        return
    assert_context_parallel_equals_one_process(saved, family, ulysses, ring, tmp_path, torchrun)


@pytest.mark.parametrize(("ulysses", "ring"), CP_LAYOUTS, ids=[f"ulysses{u}-ring{r}" for u, r in CP_LAYOUTS])
def test_cosmos_video_to_world_timesteps_per_frame_under_context_parallelism(saved, ulysses, ring, tmp_path,
                                                                             torchrun):
    """Video2World's timestep per latent frame, embedded per token before the blocks, split by each block."""
    assert_context_parallel_equals_one_process(saved, "cosmos", ulysses, ring, tmp_path, torchrun, per_frame=True)


@pytest.mark.parametrize(("ulysses", "ring"), [*CP_LAYOUTS, (2, 2)], ids=lambda n: str(n))
def test_ltx_2_split_rotary_tables_under_context_parallelism(ulysses, ring, tmp_path, torchrun):
    """LTX-2's split rope type: its rotary tables are ``[B, H, T, D / 2]``, not ``[B, T, D]``, and split on their
    tokens all the same; under ring attention the audio attends the video gathered from every rank, in shard
    order over both groups (Ulysses 2 x ring 2)."""
    torch.manual_seed(0)
    row = BY_FAMILY["ltx-2"]
    getattr(diffusers, row.cls)(**row.config, rope_type="split").save_pretrained(tmp_path / "model")
    assert_context_parallel_equals_one_process({"ltx-2": tmp_path / "model"}, "ltx-2", ulysses, ring, tmp_path,
                                               torchrun)


@pytest.mark.parametrize(("ulysses", "ring"), CP_LAYOUTS, ids=[f"ulysses{u}-ring{r}" for u, r in CP_LAYOUTS])
def test_kandinsky_6_without_audio_under_context_parallelism(saved, ulysses, ring, tmp_path, torchrun):
    """Without audio its fused blocks return (video, None): lvsa gathers the video alone."""
    assert_context_parallel_equals_one_process(saved, "kandinsky-6", ulysses, ring, tmp_path, torchrun,
                                               without=("audio_hidden_states",))


@pytest.mark.parametrize(("ulysses", "ring", "beyond"), [(2, 2, True), (2, 1, False), (1, 2, False)],
                         ids=["ulysses2-ring2", "ulysses2-horizon", "ring2-horizon"])
def test_wan_animate_2_under_context_parallelism_equals_one_process(saved, ulysses, ring, beyond, tmp_path,
                                                                   torchrun):
    """Its reference pass runs whole on every rank, its generation pass in shards of whole frames. Ulysses 2 x
    ring 2 beyond the horizon: each rank takes its heads of the cached reference rows, then its ring shard's
    frames of them. At the horizon one process runs the model's own flex attention, and context parallelism
    lvsa's dense plan."""
    frames = 2 * horizon(load(saved, "wan-animate-2")) if beyond else horizon(load(saved, "wan-animate-2"))
    assert frames % (ulysses * ring) == 0
    assert_context_parallel_equals_one_process(saved, "wan-animate-2", ulysses, ring, tmp_path, torchrun,
                                               frames=frames)


@pytest.mark.parametrize(("ulysses", "ring"), CP_LAYOUTS, ids=[f"ulysses{u}-ring{r}" for u, r in CP_LAYOUTS])
def test_wan_animate_2_compiled_blocks_under_context_parallelism_equal_one_process(saved, ulysses, ring, tmp_path,
                                                                                   torchrun):
    """``compile_repeated_blocks``, as the model asks for its flex attention: the blocks compiled (inductor) with
    lvsa's sharding hooks, which pass the whole reference pass through and give the generation pass's blocks
    their shard's grid; the self-attention runs outside the graph."""
    assert_context_parallel_equals_one_process(saved, "wan-animate-2", ulysses, ring, tmp_path, torchrun,
                                               compiled=("blocks:inductor",))


@pytest.mark.parametrize("family", ["allegro", "anyflow", "hunyuan-video", "kandinsky-6", "ltx-2", "minimax-h3",
                                    "wan-vace"])
def test_compiled_model_under_context_parallelism_equals_one_process(saved, family, tmp_path, torchrun):
    """``torch.compile`` of the whole model (inductor) under ring 2: diffusers' plan (Wan VACE), its text after the
    video with a padding mask (HunyuanVideo) and each kind of sharding lvsa applies itself (dict tables, nested
    tuples, a tuple item, a packed sequence's tail, ring-gathered keys) trace into the graph, where each layer
    splits its sequence by the forward's shards; the outputs equal one uncompiled process."""
    assert_context_parallel_equals_one_process(saved, family, 1, 2, tmp_path, torchrun, compiled=("model:inductor",))


@pytest.mark.parametrize("variant", ["model:eager", "lvsa:removed"])
def test_wan_animate_2_under_context_parallelism_refuses_what_would_be_wrong(saved, variant, tmp_path, torchrun):
    """A whole-model ``torch.compile`` would trace its reference pass, which runs whole on every rank; without
    lvsa its generation pass's flex attention would see only the rank's own frames. One line each."""
    model = load(saved, "wan-animate-2")
    row = BY_FAMILY["wan-animate-2"]
    inputs = {**row.inputs(model, 44, 2, torch.Generator().manual_seed(1)), "timesteps": [torch.full((2,), 999.0)]}
    torch.save(inputs, tmp_path / "inputs.pt")
    result = torchrun(2, str(CP_WORKER), str(saved["wan-animate-2"]), row.cls, str(tmp_path / "inputs.pt"),
                      str(tmp_path / "out.pt"), "1", "2", "wan-animate-2", variant, cwd=tmp_path)
    assert result.returncode != 0
    assert {"model:eager": "ConfigError: WanAnimate2Transformer3DModel: this forward runs whole on every rank under "
                           "context parallelism, which lvsa does not trace into a compiled graph: compile its blocks "
                           "instead (transformer.compile_repeated_blocks()), or run it uncompiled",
            "lvsa:removed": "ConfigError: WanAnimate2Transformer3DModel runs under lvsa's context parallelism only "
                            "with lvsa installed (blocks.0.self_attn runs the model's own attention): its generation "
                            "pass's flex attention has no context parallelism: each rank would attend only its own "
                            "frames; call lvsa.apply on it"}[variant] in result.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", ["kandinsky-6", "ltx-2", "minimax-h3", "wan-animate-2"])
def test_context_parallel_in_half_precision_equals_one_process(saved, family, dtype, tmp_path, torchrun):
    """Ring 2 in bfloat16 and float16 (the families whose sharding lvsa applies itself, where the ranks'
    partials merge through log-sum-exp)."""
    assert_context_parallel_equals_one_process(saved, family, 1, 2, tmp_path, torchrun, dtype=dtype)


def test_wan_animate_shards_of_part_frames_are_refused(saved, tmp_path, torchrun):
    """Its motion features split with the frames: 43 frames of 16 tokens split into two equal token shards, but
    not into whole frames, and that is one line, not diffusers' assertion."""
    model = load(saved, "wan-animate")
    row = BY_FAMILY["wan-animate"]
    inputs = {**row.inputs(model, 43, 2, torch.Generator().manual_seed(1)), "timesteps": [torch.full((2,), 999.0)]}
    torch.save(inputs, tmp_path / "inputs.pt")
    result = torchrun(2, str(CP_WORKER), str(saved["wan-animate"]), row.cls, str(tmp_path / "inputs.pt"),
                      str(tmp_path / "out.pt"), "2", "1", "wan-animate", cwd=tmp_path)
    assert result.returncode != 0
    assert ("ConfigError: WanAnimateTransformer3DModel splits its per-frame inputs with the frames under context "
            "parallelism: its 43 latent frames do not split into 2 shards of whole frames") in result.stderr


def assert_context_parallel_equals_one_process(saved, family, ulysses, ring, tmp_path, torchrun, per_frame=False,
                                               without=(), frames=None, compiled=(), dtype=torch.float32):
    """Two steps of a family's model under lvsa with context parallelism (torchrun, CPU) equal one process
    (``without``: inputs of the row left out)."""
    model = load(saved, family, dtype)
    frames = frames or 2 * horizon(model) + 2  # beyond the horizon, and tokens that split over two ranks
    row = BY_FAMILY[family]
    kwargs = row.inputs(model, frames, 2, torch.Generator().manual_seed(1))
    kwargs = {k: _placed(v, dtype, "cpu") for k, v in kwargs.items() if k not in without}
    if per_frame:  # Cosmos Video2World's [B, 1, F, 1, 1], each frame at its own noise level
        ramp = torch.linspace(0.5, 1, frames).view(1, 1, frames, 1, 1)
        timesteps = [torch.full((2, 1, frames, 1, 1), t) * ramp for t in (999.0, 500.0)]
    else:
        timesteps = [torch.full((2, frames) if row.timestep_per_frame else (2,), t, dtype=dtype)
                     for t in (999.0, 500.0)]
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    with torch.no_grad():
        one = [(row.call(model, kwargs, timestep),) if row.call else model(**kwargs, timestep=timestep,
                                                                          return_dict=False)
               for timestep in timesteps]
    handle.remove()
    torch.save({**kwargs, "timesteps": timesteps, "dtype": dtype}, tmp_path / "inputs.pt")
    result = torchrun(ulysses * ring, str(CP_WORKER), str(saved[family]), row.cls, str(tmp_path / "inputs.pt"),
                      str(tmp_path / "out.pt"), str(ulysses), str(ring), family, *compiled, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert (got["ulysses"], got["ring"]) == (ulysses, ring)
    assert got["sparse_calls"] == 2 * calls_per_forward(model, 2)
    # an input diffusers leaves whole because its rank is not the plan's: only Cosmos's per-sample timestep
    # embedding, which the plan splits only in its per-frame form
    unsplit = [m for m in got["diffusers_warnings"] if "split will not be applied" in m]
    assert unsplit == (["Expected input tensor to have 3 dimensions, but got 2 dimensions, split will not be "
                        "applied."] if family == "cosmos" and not per_frame else []), unsplit
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # the ranks' partials merge in another order
    for parallel, single in zip(got["outputs"], one, strict=True):
        assert len(parallel) == len(single)
        for got_output, expected in zip(parallel, single, strict=True):
            torch.testing.assert_close(got_output, expected, rtol=tolerance, atol=tolerance)


def test_reference_frames_are_read_off_their_token_types_and_refused_where_they_are_no_tail(saved):
    """Kandinsky 6's image frame, appended after the video, leaves the grid; token types that do not mark
    frames ending the latent are an error naming the problem, never a guessed grid; under context parallelism
    the image frame is refused (it would be split with the video)."""
    model = load(saved, "kandinsky-6")
    adapter = adapter_for(model)
    latents = {"hidden_states": torch.zeros(2, 5, HEIGHT, WIDTH, 9)}
    tail = torch.tensor([[0, 0, 0, 0, 1]] * 2)
    assert adapter.grid_of_call(model, (), latents).latent_frames == 5
    assert adapter.grid_of_call(model, (), {**latents, "visual_token_type_ids": tail}).latent_frames == 4
    assert adapter.grid_of_call(model, (), {**latents, "visual_token_type_ids": tail * 0}).latent_frames == 5
    for problem, types in [("a reference frame sits inside the video", torch.tensor([[0, 1, 0, 0, 1]] * 2)),
                           ("the samples of the batch differ", torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]])),
                           ("every frame is a reference frame", torch.ones(2, 5, dtype=torch.long)),
                           ("shape (2, 4), not [B, 5]", tail[:, 1:])]:
        with pytest.raises(ConfigError, match=r"^Kandinsky6Transformer3DModel: its visual_token_type_ids do not "
                                              r"mark reference frames after the video \(" + re.escape(problem)):
            adapter.grid_of_call(model, (), {**latents, "visual_token_type_ids": types})
    model._parallel_config = object()  # what enable_parallelism leaves on the model
    with pytest.raises(ConfigError, match=r"called with visual_token_type_ids under context parallelism, which "
                                          r"lvsa does not run: the image frame that image-to-video appends"):
        adapter.grid_of_call(model, (), {**latents, "visual_token_type_ids": tail})


def test_reference_frames_under_torch_compile_equal_eager_and_compile_once(saved_pipelines):
    """Kandinsky 6's image frame is read off its token types outside the graph: the compiled transformer equals
    eager, and a second run compiles nothing."""
    from torch._dynamo.utils import counters

    pipe = load_pipeline(saved_pipelines, "Kandinsky6TI2VAPipeline")
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    frames = (2 * horizon(pipe.transformer) - 1) * 4 + 1
    eager = generate(pipe, frames)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer)
    try:
        compiled = generate(pipe, frames)
        counters.clear()
        generate(pipe, frames)
        assert counters["stats"]["unique_graphs"] == 0, "compiled again"
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert handle.stats.fallback_calls == 0 and handle.stats.sparse_calls > 0


def test_diffusion_forcing_under_context_parallelism_is_refused(saved):
    model = load(saved, "skyreels-v2")
    adapter = lvsa.adapters.adapter_for(model)
    model._parallel_config = object()  # what enable_parallelism leaves on the model
    with pytest.raises(ConfigError, match="called with enable_diffusion_forcing under context parallelism"):
        adapter.grid_of_call(model, (), {"hidden_states": torch.zeros(1, 4, 3, 8, 8), "enable_diffusion_forcing": True})
    assert adapter.grid_of_call(model, (), {"hidden_states": torch.zeros(1, 4, 3, 8, 8)}).latent_frames == 3


def test_ltx_video_per_token_timesteps_under_context_parallelism_are_refused(saved):
    """LTXImageToVideoPipeline's timestep, one per token (the image's 0), is refused under lvsa's plan, which
    splits the video but not the per-token modulation; one per sample (LTXPipeline) runs."""
    model = load(saved, "ltx-video")
    adapter = lvsa.adapters.adapter_for(model)
    model._parallel_config = object()  # what enable_parallelism leaves on the model
    inputs = _ltx(model, 3, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"called with a timestep of shape \(1, 192\) under context parallelism, "
                                          r"where lvsa runs one per sample: the image-to-video"):
        adapter.grid_of_call(model, (), {**inputs, "timestep": torch.ones(1, 3 * HEIGHT * WIDTH)})
    assert adapter.grid_of_call(model, (), {**inputs, "timestep": torch.ones(1)}).latent_frames == 3


def test_hunyuan_video_token_replace_under_context_parallelism_is_refused(saved):
    model = load(saved, "hunyuan-video")
    adapter = lvsa.adapters.adapter_for(model)
    adapter.check_context_parallel(model, 2)  # text-to-video and latent_concat image-to-video run
    model.register_to_config(image_condition_type="token_replace")  # HunyuanVideo I2V's config
    with pytest.raises(ConfigError, match=r"^HunyuanVideoTransformer3DModel with image_condition_type='token_replace': "
                                          r"lvsa's context parallelism does not run it: the token_replace "
                                          r"image-to-video model modulates the first frame's tokens apart"):
        adapter.check_context_parallel(model, 2)


def test_motif_video_decoder_layers_under_context_parallelism_are_refused(saved):
    model = load(saved, "motif-video")
    adapter = lvsa.adapters.adapter_for(model)
    adapter.check_context_parallel(model, 2)
    model.register_to_config(num_decoder_layers=1)
    with pytest.raises(ConfigError, match=r"^MotifVideoTransformer3DModel with num_decoder_layers=1: lvsa's context "
                                          r"parallelism does not run it: its decoder blocks attend a copy"):
        adapter.check_context_parallel(model, 2)


def test_context_parallel_of_an_undeclared_family_is_refused_with_its_reason(saved):
    """Every family declares context parallelism today; one that does not says why, in one line."""
    from dataclasses import replace

    assert all(f.context_parallel for f in DECLARED)
    model = load(saved, "wan-animate-2")
    family = replace(FAMILY_OF["wan-animate-2"], context_parallel=False, no_context_parallel="a reason of its own")
    with pytest.raises(ConfigError, match="lvsa's context parallelism is not declared for wan-animate-2: a reason "
                                          "of its own; run it in one process"):
        DeclaredAdapter(family).check_context_parallel(model, 2)


def test_every_family_declares_context_parallelism_or_says_why_not():
    for family in DECLARED:
        assert family.context_parallel != bool(family.no_context_parallel), family.name
        if family.context_parallel:  # a sharding plan of its own, or diffusers'
            assert family.cp_plan is not None or family.classes[0] in _DIFFUSERS_CP_PLANS, family.name
        if family.cp_whole_when:  # a forward that runs whole passes lvsa's hooks only: diffusers' would split it
            entries = [v for value in family.cp_plan.values()
                       for v in (value.values() if isinstance(value, dict) else [value])]
            assert all(_lvsa_split(entry) for entry in entries), family.name


_DIFFUSERS_CP_PLANS = {c for c in dir(diffusers) if c.endswith("Transformer3DModel")
                       and getattr(getattr(diffusers, c), "_cp_plan", None)}


# -- the generic example ------------------------------------------------------------------------------------
GENERATE = ROOT / "examples" / "generate.py"


def _generate(*args, cwd):
    return subprocess.run([sys.executable, str(GENERATE), *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_the_generic_example_picks_the_family_from_the_folder(tmp_path):
    from lvsa_app.models import example_model

    torch.manual_seed(0)
    example_model("wan-vace").tiny_pipeline().save_pretrained(tmp_path / "vace")
    result = _generate("--model", str(tmp_path / "vace"), "--num-frames", "161", "--height", "64", "--width", "64",
                       "--steps", "2", "--lvsa", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "outputs" / "wan-vace_161f_lvsa.mp4"
    assert output.is_file() and output.stat().st_size > 0
    assert "model wan-vace" in result.stderr + result.stdout
    assert "0 fell back" in result.stderr + result.stdout


@pytest.mark.parametrize("family", sorted(f.name for f in DECLARED if f.name in EXAMPLES))
def test_the_generic_example_runs_each_family_with_an_example_sparse(tmp_path, family):
    """The small model of each declared family with an example, past its horizon: an mp4 written, every layer
    call sparse."""
    example = example_model(family)
    result = _generate("--family", family, "--steps", "2", "--lvsa", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "outputs" / f"{family}_{example.tiny_frames}f_lvsa.mp4"
    assert output.is_file() and output.stat().st_size > 0
    log = result.stderr + result.stdout
    assert f"(model {family}," in log
    calls = re.search(r"lvsa: (\d+) layer calls sparse, 0 fell back", log)
    assert calls and int(calls[1]) > 0, log[-2000:]


def test_the_generic_example_refuses_what_it_cannot_run(tmp_path):
    folder = tmp_path / "latte"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "LattePipeline", '
                                             '"transformer": ["diffusers", "LatteTransformer3DModel"]}')
    result = _generate("--model", str(folder), "--lvsa", cwd=tmp_path)
    assert result.returncode == 2
    assert "LatteTransformer3DModel is not supported by lvsa: factorised attention" in result.stderr
    result = _generate("--family", "cosmos", "--lvsa", cwd=tmp_path)
    assert result.returncode == 2 and "no example pipelines for the family 'cosmos'" in result.stderr
    result = _generate("--model", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and "cannot read" in result.stderr
    modular = tmp_path / "minimax"
    modular.mkdir()
    (modular / "modular_model_index.json").write_text('{"_class_name": "MiniMaxH3ModularPipeline"}')
    result = _generate("--model", str(modular), "--lvsa", cwd=tmp_path)
    assert result.returncode == 2
    assert "a modular pipeline (modular_model_index.json), which generate.py does not load" in result.stderr


def test_wan_animate_2_attends_what_its_block_mask_allows_within_the_plan(saved, layer_calls, monkeypatch):
    """Independent of how lvsa unpacks the generation pass: each packed call's output equals flex attention over
    the model's own packed tensors under the model's own BlockMask rule, narrowed to the plan's frame pairs of
    the video (its reference pairs kept)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from lvsa.adapters.declared import DispatchProcessor
    from lvsa.backends.reference import frame_mask

    packed = []
    real = DispatchProcessor._with_references

    def recording(self, query, key, value, block_mask, *args):
        out = real(self, query, key, value, block_mask, *args)
        packed.append((query, key, value, block_mask, out))
        return out

    monkeypatch.setattr(DispatchProcessor, "_with_references", recording)
    model = load(saved, "wan-animate-2")
    frames = 2 * horizon(model) + 1
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    try:
        run(model, frames, timesteps=(999.0, 667.0))
    finally:
        handle.remove()
    plans = [plan for (_s, _o, plan, *_rest), refs in zip(layer_calls, layer_calls.references, strict=True)
             if refs is not None]
    assert len(packed) == len(plans) == 4 and len({p.offset for p in plans}) == 2  # two steps, rotated
    for (query, key, value, block_mask, out), plan in zip(packed, plans, strict=True):
        P, video_rows = plan.patches_per_frame, query.shape[1]
        allowed = frame_mask(plan)
        model_rule = block_mask.mask_mod

        def within_plan(b, h, q, kv, allowed=allowed, model_rule=model_rule, P=P, video_rows=video_rows):
            video_pair = allowed[(q // P).clamp(max=allowed.shape[0] - 1), (kv // P).clamp(max=allowed.shape[0] - 1)]
            return model_rule(b, h, q, kv) & ((kv >= video_rows) | video_pair)

        mask = create_block_mask(within_plan, None, None, query.shape[1], key.shape[1], device="cpu")
        expected = flex_attention(*(x.double().transpose(1, 2) for x in (query, key, value)), block_mask=mask)
        tokens = plan.latent_frames * P
        torch.testing.assert_close(out[:, :tokens].double(), expected.transpose(1, 2)[:, :tokens], rtol=2e-5,
                                   atol=2e-5)


def test_wan_animate_2_layouts_it_would_not_attend_as_the_model_does_are_refused(saved):
    """A segment smaller than the layout the BlockMask is built for (the model would attend the zero rows between
    them) and latents of different sizes in one forward stop with one line each."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    model = load(saved, "wan-animate-2")
    frames = 2 * horizon(model) + 1
    inputs = BY_FAMILY["wan-animate-2"].inputs(model, frames, 1, torch.Generator().manual_seed(1))
    grid = torch.tensor([[frames - 1, HEIGHT // 2, WIDTH // 2]])
    handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
    try:
        with torch.no_grad():
            cache = WanAnimate2KVCache(len(model.blocks))
            common = {"timestep": torch.tensor([900.0]), "encoder_hidden_states": inputs["encoder_hidden_states"],
                      "kv_cache": cache}
            model(inputs["driving_latents"], condition_latents=inputs["driving_condition"], kv_cache_mode="extract",
                  seq_len=(frames - 1) * HEIGHT * WIDTH // 4, offset_grid_sizes=grid, **common)
            with pytest.raises(ConfigError, match=r"blocks\.0\.self_attn: lvsa runs the packed reference layout "
                                                  r"that WanAnimate2's pipeline builds, not a segment of 4x4 tokens"):
                model(inputs["hidden_states"], condition_latents=inputs["condition_latents"], kv_cache_mode="cached",
                      seq_len=frames * HEIGHT * WIDTH // 4, reference_grid_sizes=grid, origin_len=4 * (frames - 2) + 1,
                      origin_area=[16 * HEIGHT, 16 * WIDTH], **common)
            mixed = [inputs["driving_latents"][0], inputs["driving_latents"][0][:, :-1]]
            with pytest.raises(ConfigError, match="not a list of \\[C, F, H, W\\] latents of one size"):
                model(mixed, condition_latents=[inputs["driving_condition"][0]] * 2, kv_cache_mode="extract",
                      seq_len=(frames - 1) * HEIGHT * WIDTH // 4, offset_grid_sizes=grid, **common)
    finally:
        handle.remove()


def _wan_animate_2_segments(folder):
    torch.manual_seed(0)
    config = {**BY_FAMILY["wan-animate-2"].config, "in_dim": 20, "out_dim": 16}  # its pipeline's 16 latent channels
    diffusers.WanAnimate2Transformer3DModel(**config).save_pretrained(folder)
    return _calls.wan_animate_2_segments(folder)


def _wan_animate_2_generate(pipe, segment_frames=81):
    with torch.inference_mode():
        return pipe(**_calls.wan_animate_2_segment_inputs(segment_frames), generator=torch.Generator().manual_seed(1),
                    output="latents")


def test_wan_animate_2_segments_equal_the_model_at_the_horizon_and_rotate_beyond_it(tmp_path, layer_calls):
    pipe = _wan_animate_2_segments(tmp_path)
    dense = _wan_animate_2_generate(pipe)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error"))
    assert torch.equal(_wan_animate_2_generate(pipe), dense)
    # per segment: the reference pass, then three steps of a conditional and an unconditional call, two layers each
    assert handle.stats.sparse_calls == 2 * (1 + 3 * 2) * 2 and handle.stats.fallback_calls == 0
    layer_calls.clear()
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error", reference_latent_frames=11))
    _wan_animate_2_generate(pipe)
    # each segment restarts the step count: its reference pass and first step at the first timestep
    assert [call[0] for call in layer_calls] == [0] * 2 * 3 + [1] * 4 + [2] * 4 + [0] * 2 * 3 + [1] * 4 + [2] * 4
    assert handle.stats.fallback_calls == 0
    generation = [(call, refs) for call, refs in zip(layer_calls, layer_calls.references, strict=True) if refs]
    assert len(generation) == 2 * 3 * 2 * 2
    assert len({call[2].offset for call, _ in generation}) == 3  # the keyframes rotate over the three steps
    for (_step, _origin, plan, video, text, padding, out), references in zip(layer_calls, layer_calls.references,
                                                                             strict=True):
        assert plan.kfi > 1 and plan.latent_frames == (22 if references is not None else 21)
        assert_reference(plan, video, text, padding, out, references=references)


@pytest.mark.parametrize(("ulysses", "ring"), CP_LAYOUTS, ids=[f"ulysses{u}-ring{r}" for u, r in CP_LAYOUTS])
def test_wan_animate_2_segments_under_context_parallelism_equal_one_process(tmp_path, ulysses, ring, torchrun):
    """The segment loop beyond the horizon with context parallelism: each segment's reference pass whole on
    every rank, its generation passes (sequential CFG) in shards of whole frames, the plan rotating per step."""
    pipe = _wan_animate_2_segments(tmp_path / "model")
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error", reference_latent_frames=11))
    one = _wan_animate_2_generate(pipe)
    handle.remove()
    torch.save(_calls.wan_animate_2_segment_inputs(), tmp_path / "inputs.pt")
    result = torchrun(ulysses * ring, str(CP_PIPELINE_WORKER), str(tmp_path / "model"), "wan-animate-2",
                      str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), str(ulysses), str(ring), "11",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["sparse_calls"] == handle.stats.sparse_calls == 2 * (1 + 3 * 2) * 2
    assert got["plan_builds"] == handle.stats.plan_builds > 2
    torch.testing.assert_close(got["latents"], one, rtol=1e-4, atol=1e-4)


def test_lvsa_splits_a_nested_rotary_tuple_passed_by_keyword_or_by_position():
    """The split a ``split_within`` entry declares (Allegro's per-token positions) takes this rank's shard whether
    the block gets the tuple by keyword or by position, and keeps the tables whole."""
    from types import SimpleNamespace

    from lvsa.adapters.declared import _WithinSplit

    def forward(hidden_states, image_rotary_emb=None):
        return hidden_states

    tables, positions = (torch.ones(4, 2),), (torch.arange(8)[None], torch.arange(8, 16)[None])
    hook = _WithinSplit("block", forward, "image_rotary_emb", 1, 1, 2, SimpleNamespace(degree=2, shard_index=1))
    _, by_keyword = hook(None, (torch.zeros(1),), {"image_rotary_emb": (tables, positions)})
    by_position, _ = hook(None, (torch.zeros(1), (tables, positions)), {})
    for split in (by_keyword["image_rotary_emb"], by_position[1]):
        assert split[0] is tables and [p.tolist() for p in split[1]] == [[[4, 5, 6, 7]], [[12, 13, 14, 15]]]
    with pytest.raises(ConfigError, match=r"block: image_rotary_emb\[1\] of shape \(1, 7\) does not split into 2"):
        hook(None, (), {"image_rotary_emb": (tables, (torch.arange(7)[None],))})
