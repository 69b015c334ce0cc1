"""Calls of a family's transformer at one step that are not one forward of the inputs, and pipelines run
without their encoders, shared by tests/test_families.py and its torchrun workers."""

from __future__ import annotations

from typing import Any, ClassVar

import torch


def wan_animate_2_step(model, inputs, timestep):
    """One step as WanAnimate2RefExtractStep and WanAnimate2SegmentDenoiseInner call the transformer: the
    reference pass fills the cache, the generation pass attends it (origin_len and origin_area as the pipeline
    passes them: the segment's video frames, its size in pixels)."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    inner = getattr(model, "_orig_mod", model)
    _, frames, height, width = inputs["hidden_states"][0].shape
    segment = frames - 1
    # a row per sample: the model's rotary embedding runs over the samples its grid lists
    grid = torch.tensor([[segment, height // 2, width // 2]] * len(inputs["hidden_states"]))
    cache = WanAnimate2KVCache(len(inner.blocks))
    text = inputs["encoder_hidden_states"]
    model(inputs["driving_latents"], timestep=timestep, encoder_hidden_states=text,
          condition_latents=inputs["driving_condition"], kv_cache=cache, kv_cache_mode="extract",
          seq_len=segment * height * width // 4, offset_grid_sizes=grid)
    out = model(inputs["hidden_states"], timestep=timestep, encoder_hidden_states=text,
                condition_latents=inputs["condition_latents"], kv_cache=cache, kv_cache_mode="cached",
                seq_len=frames * height * width // 4, reference_grid_sizes=grid, origin_len=4 * (segment - 1) + 1,
                origin_area=[8 * height, 8 * width], return_dict=False)[0]
    return torch.stack(out)



def wan_animate_2_segments(folder: str) -> Any:
    """WanAnimate2DenoiseStep's segment loop, without its VAE steps, on the transformer saved in ``folder``: each
    segment draws its noise, resets the scheduler, runs the reference pass and denoises with sequential CFG (the
    guider's unconditional branch skips the model's tenth block: the tiny model has two)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimate2Transformer3DModel
    from diffusers.modular_pipelines.wan_animate_2 import denoise as steps

    class Segments(steps.WanAnimate2SegmentLoopWrapper):
        block_classes: ClassVar[list] = [steps.WanAnimate2SegmentPrepareStep,
                                         steps.WanAnimate2SegmentSchedulerResetStep, steps.WanAnimate2RefExtractStep,
                                         steps.WanAnimate2SegmentDenoiseInner]
        block_names: ClassVar[list] = ["prepare", "scheduler_reset", "reference", "denoise"]

    pipe = Segments().init_pipeline()
    pipe.update_components(transformer=WanAnimate2Transformer3DModel.from_pretrained(folder).eval(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_animate_2_segment_inputs(segment_frames: int = 81) -> dict[str, Any]:
    """Two segments of ``segment_frames`` frames at 64 x 64 in three steps, the VAE's latents given (random)."""
    g = torch.Generator().manual_seed(0)
    frames = (segment_frames - 1) // 4 + 1
    return {"num_segments": 2, "segment_frame_length": segment_frames, "height": 64, "width": 64,
            "num_inference_steps": 3, "reference_latents": torch.randn(4, frames + 1, 8, 8, generator=g),
            "driving_video_latents": torch.randn(1, 16, frames, 8, 8, generator=g),
            "driving_video_condition": torch.randn(4, frames, 8, 8, generator=g),
            "prompt_ref_embeds": torch.randn(1, 6, 16, generator=g),
            "prompt_embeds": torch.randn(1, 6, 16, generator=g),
            "negative_prompt_embeds": torch.randn(1, 6, 16, generator=g),
            "condition_clip_context": torch.zeros(1, 1, 1280), "max_seq_len": (frames + 1) * 16,
            "max_seq_len_ref": frames * 16, "grid_sizes_ref": torch.tensor([[frames, 4, 4]])}


#: a family's step, where it is not ``model(**inputs, timestep=t, return_dict=False)``
STEPS = {"wan-animate-2": wan_animate_2_step}
