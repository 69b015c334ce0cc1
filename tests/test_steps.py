"""Exactly one rotation step per denoising step: every family, fp32/fp16/bf16 (the pipelines cast the timestep
to the transformer's dtype, where neighbouring timesteps collide), CFG batched and sequential, Wan 2.2's two
transformers, an interrupted generation, custom loops. Through the real diffusers pipelines."""

from __future__ import annotations

import logging

import pytest
import torch

import lvsa
from lvsa.adapters import adapter_named
from lvsa_app.models import example_model

FAMILIES = ["wan", "hunyuan", "cogvideox"]
FRAMES = {"wan": 9, "hunyuan": 9, "cogvideox": 9}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pipe(name, dtype):
    torch.manual_seed(0)
    pipe = example_model(name).tiny_pipeline().to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _record(handle):
    """The runtime's step at every transformer forward (read right after lvsa's own hook)."""
    seen = []
    for transformer in handle.transformers:
        transformer.register_forward_pre_hook(lambda *_: seen.append(handle.runtime.step))
    return seen


def _generate(pipe, name, steps, dtype, **extra):
    adapter = adapter_named(name)
    example = example_model(adapter.name)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in example.pipeline_inputs(pipe, None, seed=0).items()}
    with torch.inference_mode():
        pipe(**inputs, **example.call_arguments(pipe, 5.0), height=64, width=64, num_frames=FRAMES[name],
             num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent", **extra)


def _assert_one_step_each(seen, steps):
    assert seen, "the transformer never ran"
    assert seen == sorted(seen), f"the step went backwards: {seen}"
    assert sorted(set(seen)) == list(range(steps)), f"steps seen {sorted(set(seen))} for {steps} denoising steps"
    per_step = len(seen) // steps
    assert all(seen.count(i) == per_step for i in range(steps)), seen


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", FAMILIES)
def test_one_step_per_denoising_step(name, dtype):
    pipe = _pipe(name, dtype)
    handle = lvsa.apply(pipe, lvsa.LVSASettings())
    seen = _record(handle)
    _generate(pipe, name, 50, dtype)
    _assert_one_step_each(seen, 50)
    assert handle.stats.steps == 50


def test_the_timestep_alone_collides_in_bfloat16(caplog):
    """Why the pipeline's schedule is used: the bf16 timesteps of HunyuanVideo 1.5 repeat; applied to the bare
    transformer (no schedule to read), lvsa says so instead of silently skipping rotation steps."""
    pipe = _pipe("hunyuan", torch.bfloat16)
    caplog.set_level(logging.WARNING, logger="lvsa")
    timesteps = []
    pipe.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: timesteps.append(float(kwargs["timestep"].max())), with_kwargs=True)
    lvsa.apply(pipe.transformer, lvsa.LVSASettings())
    _generate(pipe, "hunyuan", 50, torch.bfloat16)
    distinct = len(dict.fromkeys(timesteps))
    assert distinct < 50, "the collision this guards against no longer happens"
    assert "timestep reaches the transformer in bfloat16" in caplog.text
    assert "lvsa.apply(pipe)" in caplog.text


def test_wan_2_2_two_transformers_share_one_step():
    from diffusers import WanPipeline

    pipe = _pipe("wan", torch.bfloat16)
    torch.manual_seed(1)
    second = example_model("wan").tiny_pipeline().transformer.to(torch.bfloat16)
    two = WanPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, transformer_2=second,
                      vae=pipe.vae, scheduler=pipe.scheduler, boundary_ratio=0.5)
    two.set_progress_bar_config(disable=True)
    handle = lvsa.apply(two, lvsa.LVSASettings())
    seen = _record(handle)
    _generate(two, "wan", 20, torch.bfloat16)
    _assert_one_step_each(seen, 20)


def test_an_interrupted_generation_restarts_at_zero():
    pipe = _pipe("wan", torch.bfloat16)
    handle = lvsa.apply(pipe, lvsa.LVSASettings())

    def stop_at_4(pipeline, i, t, kwargs):
        if i == 3:
            pipeline._interrupt = True
        return {}

    _generate(pipe, "wan", 10, torch.bfloat16, callback_on_step_end=stop_at_4)
    assert handle.runtime.step == 3
    seen = _record(handle)
    _generate(pipe, "wan", 10, torch.bfloat16)
    _assert_one_step_each(seen, 10)


def test_a_custom_loop_sets_the_step():
    pipe = _pipe("wan", torch.float32)
    handle = lvsa.apply(pipe.transformer, lvsa.LVSASettings())
    transformer, runtime = pipe.transformer, handle.runtime
    hidden = torch.randn(1, 16, 3, 8, 8)
    text = torch.randn(1, 4, 32)
    seen = _record(handle)
    with torch.inference_mode():
        for i in range(5):
            runtime.set_step(i)
            for _ in range(2):  # two CFG branches at the same (constant) timestep
                transformer(hidden, torch.tensor([500.0]), text)
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="step"):
        runtime.set_step(-1)
