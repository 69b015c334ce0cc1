"""lvsa inside real diffusers pipelines (Wan, HunyuanVideo 1.5, CogVideoX), on small random-weight models.

Each family's model is built from a config, saved with ``save_pretrained`` and loaded back through the
example scripts' loader (the path ``--model`` takes), so the real loading code runs. Pipelines run in
float32 on the CPU with ``output_type="latent"`` unless the test is about the decoded video."""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

import lvsa
from lvsa.adapters import adapter_named, handle_of
from lvsa.attention import context as context_module
from lvsa.backends.reference import reference_attention
from lvsa.errors import ConfigError
from lvsa.kernels.attention_ops import dense_attention, key_mask_with_text
from lvsa_app.generation import load_pipeline, main
from lvsa_app.models import example_model

FAMILIES = ["wan", "hunyuan", "cogvideox"]
#: video frames at the training horizon (T = reference) and about twice beyond it
AT_HORIZON = {"wan": 81, "hunyuan": 129, "cogvideox": 49}
BEYOND = {"wan": 161, "hunyuan": 257, "cogvideox": 97}
ROPE_ARGUMENT = {"wan": "rotary_emb", "hunyuan": "image_rotary_emb", "cogvideox": "image_rotary_emb"}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folders = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        example_model(name).tiny_pipeline().save_pretrained(folder)
        folders[name] = folder
    return folders


def load(saved_models, name):
    pipe = load_pipeline(adapter_named(name), str(saved_models[name]), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, name, frames, steps=2, **overrides):
    adapter = adapter_named(name)
    example = example_model(adapter.name)
    call = {**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0),
            "height": 64, "width": 64, "num_frames": frames, "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(0), "output_type": "latent", **overrides}
    with torch.inference_mode():
        return pipe(**call).frames


@pytest.mark.parametrize("name", FAMILIES)
def test_at_the_horizon_lvsa_equals_dense(saved_models, name, caplog):
    pipe = load(saved_models, name)
    dense = generate(pipe, name, AT_HORIZON[name])
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(pipe, lvsa.LVSASettings(sparsity_scale=1.0))
    sparse = generate(pipe, name, AT_HORIZON[name])
    plan = handle.runtime.last_plan
    assert plan.kfi == 1 and plan.density == 1.0
    assert handle.stats.sparse_calls > 0 and handle.stats.fallback_calls == 0
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    assert f"attended_per_frame={plan.latent_frames}/{plan.latent_frames}" in caplog.text


def test_hunyuan_padding_mask_is_honoured(saved_models):
    """The small HunyuanVideo inputs carry padded text tokens: dropping the mask changes the output."""
    pipe = load(saved_models, "hunyuan")
    inputs = example_model("hunyuan").pipeline_inputs(pipe, None, seed=0)
    assert not inputs["prompt_embeds_mask"].bool().all()
    dense = generate(pipe, "hunyuan", AT_HORIZON["hunyuan"])
    lvsa.apply(pipe, lvsa.LVSASettings())
    honoured = generate(pipe, "hunyuan", AT_HORIZON["hunyuan"])
    torch.testing.assert_close(honoured, dense, rtol=1e-4, atol=1e-4)
    unmasked = {k: torch.ones_like(v) if "mask" in k else v for k, v in inputs.items()}
    ignored = generate(pipe, "hunyuan", AT_HORIZON["hunyuan"], **unmasked)
    assert (ignored - dense).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_beyond_the_horizon_the_plan_engages(saved_models, name, caplog):
    pipe = load(saved_models, name)
    dense = generate(pipe, name, BEYOND[name])
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(pipe, lvsa.LVSASettings())
    sparse = generate(pipe, name, BEYOND[name])
    plan = handle.runtime.last_plan
    assert plan.kfi > 1 and plan.density < 1
    assert f"[LVSA] kfi={plan.kfi} global_count={len(plan.globals)}" in caplog.text
    assert "extension_ratio=" in caplog.text
    assert (sparse - dense).abs().max() > 1e-3
    handle.remove()
    torch.testing.assert_close(generate(pipe, name, BEYOND[name]), dense)  # remove() restores the model


def test_rotation_advances_once_per_step(saved_models, monkeypatch):
    """Wan runs the two CFG branches as two forwards per step; the plan is still built once per step."""
    built = []
    real_build = context_module.build_plan

    def counting_build(*args, **kwargs):
        built.append(kwargs["step"])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(context_module, "build_plan", counting_build)
    pipe = load(saved_models, "wan")
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    handle = lvsa.apply(pipe, lvsa.LVSASettings())
    generate(pipe, "wan", BEYOND["wan"], steps=4)
    assert len(forwards) == 8  # two per step: the rotation must not follow forwards
    assert built == [0, 1, 2, 3]
    assert handle.stats.steps == 4 and handle.stats.plan_builds == 4
    generate(pipe, "wan", BEYOND["wan"], steps=4)  # a new generation starts again at step 0
    assert handle.runtime.step == 3 and built == [0, 1, 2, 3]  # same steps: plans are reused, not rebuilt


def test_without_rotation_one_plan_serves_every_step(saved_models, monkeypatch):
    pipe = load(saved_models, "wan")
    handle = lvsa.apply(pipe, lvsa.LVSASettings(rotate_keyframes=False))
    generate(pipe, "wan", BEYOND["wan"], steps=3)
    assert handle.stats.plan_builds == 1 and not handle.runtime.last_plan.rotating


def test_wrong_geometry_falls_back_loudly_or_fails(saved_models, monkeypatch, caplog):
    pipe = load(saved_models, "wan")
    dense = generate(pipe, "wan", BEYOND["wan"])
    monkeypatch.setenv("LVSA_PATCHES_PER_FRAME", "7")
    monkeypatch.setenv("LVSA_FALLBACK", "warn")
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(pipe)
    out = generate(pipe, "wan", BEYOND["wan"])
    seq_len = 41 * 16
    assert (f"[LVSA-FALLBACK] origin=blocks.0.attn1 reason=geometry_detect seq_len={seq_len} known_ppf=[7,16]"
            in caplog.text)
    assert caplog.text.count("[LVSA-FALLBACK]") == 1  # loud once, not once per layer call
    assert handle.stats.fallback_calls > 0 and handle.stats.sparse_calls == 0
    torch.testing.assert_close(out, dense)  # the fallback is the model's own attention
    monkeypatch.setenv("LVSA_FALLBACK", "error")
    lvsa.apply(pipe)
    with pytest.raises(lvsa.GeometryError, match="reason=geometry_detect seq_len=656"):
        generate(pipe, "wan", BEYOND["wan"])


def test_a_reference_that_disagrees_with_the_model_is_warned_about(saved_models, caplog):
    pipe = load(saved_models, "hunyuan")
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(pipe, lvsa.LVSASettings(reference_latent_frames=21))
    assert "reference_latent_frames=21 (code) differs from the model's 33" in caplog.text
    assert handle.runtime.knobs.reference_latent_frames == 21  # warned, not overridden


def test_wan_2_2_pipelines_get_lvsa_on_both_transformers(saved_models):
    from diffusers import WanPipeline

    pipe = load(saved_models, "wan")
    second = type(pipe.transformer).from_pretrained(saved_models["wan"] / "transformer")
    two = WanPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, transformer_2=second,
                      vae=pipe.vae, scheduler=pipe.scheduler, boundary_ratio=0.5)
    two.set_progress_bar_config(disable=True)
    dense = generate(two, "wan", AT_HORIZON["wan"], steps=4)
    handle = lvsa.apply(two)
    assert {"transformer.blocks.0.attn1", "transformer_2.blocks.1.attn1"} <= set(handle.layers)
    out = generate(two, "wan", AT_HORIZON["wan"], steps=4)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    assert handle.stats.steps == 4  # one step counter across both transformers
    assert lvsa.remove(two) and handle_of(two) is None


@pytest.mark.parametrize("name", FAMILIES)
def test_riflex_changes_exactly_one_temporal_frequency(saved_models, name, monkeypatch):
    pipe = load(saved_models, name)
    adapter = adapter_named(name)
    processor_class = type(adapter.make_processor(None, None, "probe"))
    seen = []
    real_call = processor_class.__call__

    @functools.wraps(real_call)  # diffusers reads the processor's signature to pass its arguments
    def spy(self, attn, hidden_states, *args, **kwargs):
        names = list(real_call.__code__.co_varnames[3:real_call.__code__.co_argcount])
        values = dict(zip(names, args, strict=False)) | kwargs
        seen.append(values[ROPE_ARGUMENT[name]])
        return real_call(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(processor_class, "__call__", spy)
    tables = {}
    for label, settings in {"plain": lvsa.LVSASettings(), "s1": lvsa.LVSASettings(riflex=True, riflex_s=1.0),
                            "s2": lvsa.LVSASettings(riflex=True, riflex_s=2.0)}.items():
        seen.clear()
        lvsa.apply(pipe, settings)
        generate(pipe, name, BEYOND[name], steps=1)
        tables[label] = [t.reshape(-1, t.shape[-1]).clone() for t in seen[0]]
    t_dim = adapter.temporal_rope(pipe.transformer).t_dim
    for plain, same, changed in zip(tables["plain"], tables["s1"], tables["s2"], strict=True):
        torch.testing.assert_close(same, plain, rtol=0, atol=0)  # s = 1: no change at all
        columns = ((changed - plain).abs().amax(dim=0) > 1e-6).nonzero().flatten().tolist()
        assert len(columns) == 2 and columns[1] == columns[0] + 1 and columns[0] % 2 == 0  # one frequency
        assert columns[1] < t_dim  # and it is a temporal one


def test_the_example_writes_an_mp4_with_every_frame(saved_models, tmp_path, monkeypatch, capsys):
    import imageio
    monkeypatch.chdir(tmp_path)
    code = main("wan", ["--model", str(saved_models["wan"]), "--num-frames", "17", "--steps", "2",
                        "--lvsa", "--output-dir", "videos", "--output-name", "clip"])
    assert code == 0
    target = tmp_path / "videos" / "clip.mp4"
    out = capsys.readouterr().out
    assert f"output: {target}" in out and "s/step" in out and "memory:" in out
    with imageio.get_reader(target) as reader:
        assert reader.count_frames() == 17
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("name", FAMILIES)
def test_the_example_saves_a_loadable_latent(saved_models, name, tmp_path):
    code = main(name, ["--model", str(saved_models[name]), "--num-frames", str(AT_HORIZON[name]), "--steps", "1",
                       "--lvsa", "--output-latent", "--output-dir", str(tmp_path), "--output-name", "latent",
                       "--sparsity-scale", "0.5"])
    assert code == 0
    record = torch.load(tmp_path / "latent.pt")
    assert record["num_frames"] == AT_HORIZON[name]
    assert record["latent"].ndim == 5 and torch.isfinite(record["latent"]).all()
    assert record["settings"]["sparsity_scale"] == 0.5 and record["settings"]["enabled"] is True


def test_the_example_reads_lvsa_variables_and_rejects_bad_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "-1")
    assert main("cogvideox", ["--lvsa", "--steps", "1", "--num-frames", "9"]) == 2
    assert "LVSA_SPARSITY_SCALE" in capsys.readouterr().err


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    from lvsa.files import atomic_write

    def broken(path):
        path.write_bytes(b"half a video")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "out.mp4", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_custom_loop_can_set_the_step(saved_models):
    from lvsa.adapters.base import LatentGrid

    handle = lvsa.apply(load(saved_models, "wan"))
    runtime = handle.runtime
    runtime.set_step(5)
    runtime.begin_forward(LatentGrid(41, 16), torch.tensor([500.0]))
    assert runtime.step == 5  # the timestep seen after set_step does not restart the count
    runtime.begin_forward(LatentGrid(41, 16), torch.tensor([400.0]))
    assert runtime.step == 6
    assert runtime.context.plan("probe", 41 * 16).step == 6


@pytest.fixture
def cpu_fa4(monkeypatch):
    """The fa4 driver with FlexAttention's CPU path in place of the FLASH backend, registered as ``fa4``;
    3-token tiles, so the small models' frames are not whole tiles and the keys are reordered. Yields the
    reasons of the calls that copied the keys instead of moving them in place (none expected)."""
    from lvsa.backends import fa4
    from lvsa.backends.fa4 import Fa4Driver
    from lvsa.registry import Plugin

    driver = Fa4Driver(block=3, kernel_backend=None, compiled=False, devices=frozenset({"cpu"}),
                       dtypes=frozenset({torch.float32}))
    driver.head_dims = frozenset(range(1, 257))  # the small models' heads (FlexAttention's CPU path takes any)
    plugins = dict(lvsa.registry.driver_plugins())
    plugins["fa4"] = Plugin("fa4", "tests:cpu_fa4", None, driver, None)
    copies: list[str] = []
    monkeypatch.setattr(fa4, "log_copy_once", copies.append)
    with lvsa.registry.use_plugins(lvsa.registry.DRIVERS_NAMESPACE, plugins):
        yield copies


def _fa4_against_reference(pipe, run, copies):
    """``run()`` under the reference driver and under fa4: the same latents, a sparse plan with keys
    reordered in the pipeline's own k and v (no copy), and no call that fell back."""
    from lvsa.kernels.block_mask import in_place_side

    outputs = {}
    for backend in ("reference", "fa4"):
        handle = lvsa.apply(pipe, lvsa.LVSASettings(backend=backend))
        outputs[backend] = run()
        plan = handle.runtime.last_plan
        assert plan.density < 1 and handle.stats.sparse_calls > 0 and handle.stats.fallback_calls == 0
        handle.remove()
    assert in_place_side(plan, 3, "cpu").moved is not None and not copies, copies  # really reordered, in place
    torch.testing.assert_close(outputs["fa4"], outputs["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_fa4_tiles_with_reordered_keys_equal_the_reference_in_real_pipelines(saved_models, name, cpu_fa4):
    """The fa4 driver's tiles and key order, through FlexAttention's CPU path, inside each family's pipeline
    beyond the horizon (rotating plans, CFG as each pipeline runs it, HunyuanVideo's padded text, CogVideoX's
    text before the video): the same latents as the float64-exact reference driver."""
    pipe = load(saved_models, name)
    _fa4_against_reference(pipe, lambda: generate(pipe, name, BEYOND[name], steps=3), cpu_fa4)


def test_fa4_in_the_variants_two_transformers_and_temporal_patching(saved_models, cpu_fa4):
    """The variants whose geometry differs from the families' defaults: Wan 2.2's two transformers (one step
    counter, each its own prepared plans) and CogVideoX 1.5's temporal patching (plans in token frames), beyond
    the horizon, fa4 against the reference."""
    from diffusers import WanPipeline

    from .test_frame_units import _cogvideox

    pipe = load(saved_models, "wan")
    second = type(pipe.transformer).from_pretrained(saved_models["wan"] / "transformer")
    two = WanPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, transformer_2=second,
                      vae=pipe.vae, scheduler=pipe.scheduler, boundary_ratio=0.5)
    two.set_progress_bar_config(disable=True)
    _fa4_against_reference(two, lambda: generate(two, "wan", BEYOND["wan"], steps=4), cpu_fa4)

    cog = _cogvideox(2)
    inputs = example_model("cogvideox").pipeline_inputs(cog, None, seed=0)

    def run():
        with torch.inference_mode():
            return cog(**inputs, height=64, width=64, num_frames=177, num_inference_steps=2, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0), output_type="latent").frames

    _fa4_against_reference(cog, run, cpu_fa4)


#: The image-conditioned and TI2V variants (the transformer's config and the pipeline's), built beside the saved
#: T2V models from their VAE and scheduler:
#: - Wan 2.1 I2V: image embeddings into the cross-attention, condition latents concatenated (36 channels), with a
#:   small CLIP image encoder (diffusers takes the image for the condition latents and refuses embeddings beside it);
#: - Wan 2.2 I2V A14B: two transformers, no image embeddings;
#: - Wan 2.2 TI2V in image mode: the first frame's tokens at timestep 0, so a timestep per token;
#: - Wan 2.2 TI2V-5B in text mode: 48 channels and the 5B family's horizon of 31 latent frames;
#: - HunyuanVideo 1.5 I2V: a small SigLIP image encoder; the image's tokens join the text tokens of the joint
#:   attention (masked out in T2V), and the pipeline picks the size from the transformer's target size.
VARIANTS = ["wan-i2v-2.1", "wan-i2v-2.2-two-transformers", "wan-ti2v-image", "wan-ti2v-5b-text", "hunyuan-i2v"]
#: video frames at each variant's horizon
VARIANT_HORIZON = {"wan-ti2v-5b-text": 121, "hunyuan-i2v": 129}


def _variant(saved_models, variant):
    from diffusers import HunyuanVideo15ImageToVideoPipeline, WanImageToVideoPipeline, WanPipeline

    family = variant.split("-")[0]
    base = load(saved_models, family)
    make = functools.partial(type(base.transformer).from_config, base.transformer.config)
    torch.manual_seed(0)
    parts = dict(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler)  # Wan's pipelines
    if variant == "hunyuan-i2v":
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=base.transformer.config.image_embed_dim,
                                                       intermediate_size=24, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=32, patch_size=8))
        pipe = HunyuanVideo15ImageToVideoPipeline(
            transformer=make(task_type="i2v", target_size=64), vae=base.vae, scheduler=base.scheduler,
            text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, guider=base.guider,
            image_encoder=encoder, feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}))
    elif variant == "wan-i2v-2.1":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        pipe = WanImageToVideoPipeline(**parts, image_encoder=encoder, image_processor=processor,
                                       transformer=make(in_channels=36, image_dim=32, added_kv_proj_dim=96))
    elif variant == "wan-i2v-2.2-two-transformers":
        pipe = WanImageToVideoPipeline(**parts, transformer=make(in_channels=36), transformer_2=make(in_channels=36),
                                       boundary_ratio=0.5)
    elif variant == "wan-ti2v-image":
        pipe = WanImageToVideoPipeline(**parts, transformer=make(), expand_timesteps=True)
    else:
        pipe = WanPipeline(**parts, transformer=make(in_channels=48, out_channels=48), expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate_variant(pipe, frames, steps=3):
    from PIL import Image

    family = "hunyuan" if "Hunyuan" in type(pipe).__name__ else "wan"
    example = example_model(family)
    call = {**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0),
            "num_frames": frames, "num_inference_steps": steps, "output_type": "latent",
            "generator": torch.Generator().manual_seed(0)}
    if family == "wan":
        call.update(height=64, width=64)
    if "ImageToVideo" in type(pipe).__name__:
        pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
        call["image"] = Image.fromarray(pixels.numpy())
    with torch.inference_mode():
        return pipe(**call).frames


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_equal_dense_at_their_horizon_and_rotate_beyond_it(saved_models, variant, caplog):
    """Each variant: at its model's horizon lvsa is dense and equals the model without it; beyond, the plan
    engages with the variant's horizon, one plan per denoising step (CFG runs two forwards per step, TI2V's
    timestep is a tensor per token, Wan 2.2 A14B switches transformers), and nothing falls back."""
    pipe = _variant(saved_models, variant)
    horizon = VARIANT_HORIZON.get(variant, 81)
    dense = _generate_variant(pipe, horizon)
    handle = lvsa.apply(pipe, lvsa.LVSASettings())
    torch.testing.assert_close(_generate_variant(pipe, horizon), dense, rtol=1e-4, atol=1e-4)
    assert handle.runtime.last_plan.density == 1.0 and handle.stats.sparse_calls > 0
    handle.remove()

    beyond = 2 * horizon - 1
    dense = _generate_variant(pipe, beyond, steps=4)
    caplog.set_level(logging.INFO, logger="lvsa")
    handle = lvsa.apply(pipe, lvsa.LVSASettings())
    sparse = _generate_variant(pipe, beyond, steps=4)
    plan = handle.runtime.last_plan
    latent = (horizon - 1) // 4 + 1
    assert f"[LVSA] reference_latent_frames={latent} target_latent_frames={plan.latent_frames}" in caplog.text
    assert plan.density < 1 and plan.rotating
    assert handle.stats.steps == 4 and handle.stats.plan_builds == 4, handle.stats
    assert handle.stats.sparse_calls > 0 and handle.stats.fallback_calls == 0
    assert "[LVSA-FALLBACK]" not in caplog.text
    assert (sparse - dense).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_fa4_in_image_and_ti2v_variants(saved_models, variant, cpu_fa4):
    """The fa4 driver's tiles and in-place key order inside each variant beyond its horizon, against the
    reference driver."""
    pipe = _variant(saved_models, variant)
    frames = 2 * VARIANT_HORIZON.get(variant, 81) - 1
    _fa4_against_reference(pipe, lambda: _generate_variant(pipe, frames), cpu_fa4)


# -- geometry the model declares (#30 items 1 and 2) -------------------------------------------------------

DECLARED = {  # field -> how a test reads the loaded model's own value
    "vae_temporal_factor": lambda pipe: pipe.vae_scale_factor_temporal,
    "vae_spatial_factor": lambda pipe: pipe.vae_scale_factor_spatial,
    "patch_size": lambda pipe: adapter_named(_family_of(pipe)).spatial_patch(pipe.transformer)[1],
}


def _family_of(pipe):
    return lvsa.adapters.adapter_for(pipe.transformer).name


@pytest.mark.parametrize("field", sorted(DECLARED))
@pytest.mark.parametrize("name", FAMILIES)
def test_a_geometry_override_that_contradicts_the_model_is_refused(saved_models, name, field, monkeypatch, caplog):
    """Every factor a loaded pipeline declares: a different value is an error naming both (the run would plan
    with one and compute with the other); the same value is said to be unneeded, and nothing changes."""
    pipe = load(saved_models, name)
    own = DECLARED[field](pipe)
    variable = "LVSA_" + field.upper()
    monkeypatch.setenv(variable, str(own * 2))
    with pytest.raises(lvsa.ConfigError, match=rf"{variable}={own * 2} contradicts .*, which is {own}: unset it"):
        lvsa.apply(pipe)
    assert lvsa.adapters.handle_of(pipe) is None  # nothing was installed
    monkeypatch.delenv(variable)
    with pytest.raises(lvsa.ConfigError, match=rf"{field}={own * 2} \(code\) contradicts"):
        lvsa.apply(pipe, lvsa.LVSASettings(**{field: own * 2}))
    monkeypatch.setenv(variable, str(own))
    caplog.set_level(logging.WARNING, logger="lvsa")
    handle = lvsa.apply(pipe)
    assert f"[LVSA] {variable}={own} is not needed here" in caplog.text
    plain = lvsa.apply(pipe, lvsa.LVSASettings())
    assert handle.runtime.knobs == plain.runtime.knobs


@pytest.mark.parametrize("name", FAMILIES)
def test_the_preview_is_the_plan_every_step_runs(saved_models, name, monkeypatch):
    """handle.plan_for_video (what the example prints) equals, step by step, the plan the layers were given."""
    run_plans = {}
    real_build = context_module.build_plan

    def recording_build(*args, **kwargs):
        plan = real_build(*args, **kwargs)
        run_plans[kwargs["step"]] = plan
        return plan

    monkeypatch.setattr(context_module, "build_plan", recording_build)
    pipe = load(saved_models, name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(sparsity_scale=0.7))
    generate(pipe, name, BEYOND[name], steps=3)
    assert sorted(run_plans) == [0, 1, 2]
    for step, plan in run_plans.items():
        preview = handle.plan_for_video(BEYOND[name], 64, 64, step=step)
        assert preview.text_tokens == 0
        assert dataclasses.replace(plan, text_tokens=0) == preview


def test_a_preview_with_a_contradicting_tokens_per_frame_is_an_error(saved_models, monkeypatch):
    pipe = load(saved_models, "wan")
    monkeypatch.setenv("LVSA_PATCHES_PER_FRAME", "7")
    handle = lvsa.apply(pipe)
    with pytest.raises(lvsa.GeometryError, match="LVSA_PATCHES_PER_FRAME=7 plans 7 tokens per frame, but the "
                       "model's input has 16 per frame"):
        handle.plan_for_video(BEYOND["wan"], 64, 64)


def _backends(pipe):
    return {name: getattr(module.processor, "_attention_backend", "none")
            for name, module in pipe.transformer.named_modules() if hasattr(module, "processor")}


@pytest.mark.parametrize("name", FAMILIES)
def test_remove_keeps_the_attention_backend_chosen_while_installed(saved_models, name):
    """set_attention_backend after apply reaches the model's own processors behind lvsa's (the fallback path
    runs them), so after remove every layer has what it would have had without lvsa: the user's last choice."""
    without = load(saved_models, name)
    without.transformer.set_attention_backend("_native_math")
    pipe = load(saved_models, name)
    handle = lvsa.apply(pipe)
    pipe.transformer.set_attention_backend("_native_math")
    lvsa.remove(pipe)
    assert _backends(pipe) == _backends(without)
    # CogVideoX's processors take no backend (diffusers leaves them alone); the others' do, lvsa's layers included
    assert ("_native_math" in _backends(pipe).values()) == (name != "cogvideox")
    assert not handle.layers


# -- dense warm-up steps and dense layers (lvsa.dense) ----------------------------------------------
def _joined(plan, video, text, key_padding_mask):
    if text is None:
        return video, None
    after = plan.text_position == "after"
    q, k, v = (torch.cat([a, b] if after else [b, a], dim=1) for a, b in zip(video, text, strict=True))
    mask = key_mask_with_text(key_padding_mask, q.shape[1], video[0].shape[1] if after else 0, q.shape[0], q.device)
    return (q, k, v), mask


def _output(plan, out):
    video, text = out
    if text is None:
        return video
    return torch.cat([video, text] if plan.text_position == "after" else [text, video], dim=1)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox"])
def test_dense_steps_and_layers_run_dense_attention_and_the_rest_the_plan(saved_models, name, layer_calls, caplog):
    pipe = load(saved_models, name)
    caplog.set_level(logging.INFO, logger="lvsa")
    calls = layer_calls
    handle = lvsa.apply(pipe, lvsa.LVSASettings(dense_warmup_fraction=0.34, dense_layers="0"))
    generate(pipe, name, BEYOND[name], steps=3)
    layers = sorted(handle.layers)
    assert len(layers) == 2
    dense_layer = next(n for n in layers if ".0." in n)
    assert "[LVSA] dense warm-up: step 0 of 3 runs dense, 1-2 sparse (dense_warmup_fraction=0.34 (code))" in caplog.text
    assert "[LVSA] dense layers: 1 of 2 self-attention layers (0) run dense in every step" in caplog.text
    checked = {True: 0, False: 0}
    for step, origin, plan, video, text, padding, out in calls:
        dense = step == 0 or origin == dense_layer
        assert plan.forced_dense == dense and plan.is_dense == dense, (step, origin)
        (q, k, v), key_mask = _joined(plan, video, text, padding)
        got = _output(plan, out)
        if dense:  # the same SDPA over the same tensors as the model's own attention: bit-exact
            assert torch.equal(got, dense_attention(q, k, v, key_mask))
        else:
            assert plan.kfi > 1
            torch.testing.assert_close(got.double(), reference_attention(q, k, v, plan, padding), rtol=2e-5, atol=2e-5)
        checked[dense] += 1
    assert checked[True] and checked[False]
    per_forward = len(calls) // (3 * len(layers))  # CFG forwards per step (1 batched or 2 sequential)
    assert handle.stats.calls_by_step == {0: [2 * per_forward, 0], 1: [per_forward, per_forward],
                                          2: [per_forward, per_forward]}
    assert handle.stats.dense_calls == 4 * per_forward and handle.stats.fallback_calls == 0


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_every_step_and_layer_dense_is_the_model_without_lvsa(saved_models, name):
    pipe = load(saved_models, name)
    dense = generate(pipe, name, BEYOND[name], steps=2)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(dense_warmup_steps=2))
    warm = generate(pipe, name, BEYOND[name], steps=2)
    handle.remove()
    handle = lvsa.apply(pipe, lvsa.LVSASettings(dense_layers="0-1"))
    layers = generate(pipe, name, BEYOND[name], steps=2)
    torch.testing.assert_close(warm, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers, dense, rtol=1e-5, atol=1e-5)
    assert handle.stats.dense_calls == handle.stats.sparse_calls > 0
    handle.remove()
    sparse = generate(pipe, name, BEYOND[name], steps=2)
    lvsa.apply(pipe, lvsa.LVSASettings())
    assert (generate(pipe, name, BEYOND[name], steps=2) - dense).abs().max() > 1e-3  # the plan does engage
    del sparse


def test_both_transformers_of_wan_2_2_get_the_dense_layers(saved_models, layer_calls):
    pipe = _variant(saved_models, "wan-i2v-2.2-two-transformers")
    calls = layer_calls
    handle = lvsa.apply(pipe, lvsa.LVSASettings(dense_layers="1", dense_warmup_steps=1))
    assert handle.runtime.dense_layers == {"transformer.blocks.1.attn1", "transformer_2.blocks.1.attn1"}
    _generate_variant(pipe, 161, steps=3)
    seen = {(origin.split(".")[0], plan.forced_dense) for step, origin, plan, *_ in calls if step > 0}
    assert seen == {("transformer", True), ("transformer", False), ("transformer_2", True), ("transformer_2", False)}
    assert all(plan.forced_dense for step, _, plan, *_ in calls if step == 0)


def test_a_layer_index_past_the_model_is_an_error_naming_the_count(saved_models):
    pipe = load(saved_models, "wan")
    with pytest.raises(ConfigError, match=r"dense_layers='5' \(code\): WanTransformer3DModel has 2 self-attention "
                                          r"layers \(0-1\), so layer 5 does not exist"):
        lvsa.apply(pipe, lvsa.LVSASettings(dense_layers="5"))
    assert lvsa.handle_of(pipe) is None  # nothing left installed


def test_a_fraction_without_a_schedule_is_an_error_until_the_loop_gives_the_count(saved_models):
    transformer = load(saved_models, "wan").transformer
    handle = lvsa.apply(transformer, lvsa.LVSASettings(dense_warmup_fraction=0.5))
    inputs = (torch.randn(1, 16, 41, 8, 8), torch.tensor([999.0]), torch.randn(1, 8, 32))
    with pytest.raises(ConfigError, match="set_total_steps"):
        with torch.inference_mode():
            transformer(*inputs)
    handle.runtime.set_total_steps(4)
    with torch.inference_mode():
        transformer(*inputs)
    assert handle.runtime.context.dense_step


def test_the_vllm_omni_host_refuses_them_before_serving(monkeypatch):
    from lvsa_vllm_omni.serve import command

    with pytest.raises(ConfigError, match="not supported by the vLLM-Omni host"):
        command(["/models/wan", "--dense-layers", "0-1"])
