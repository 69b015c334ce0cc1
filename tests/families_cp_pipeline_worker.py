"""torchrun worker for tests/test_families.py: a modular pipeline under lvsa with context parallelism on CPU
(gloo): MiniMax-H3's (its own layout, timestep table and loop) or WanAnimate2's segment loop. Arguments:
transformer folder, workflow (``t2va`` or ``fl2va``, MiniMax-H3's; ``wan-animate-2``), inputs file (the
generation's keyword arguments), output file, ulysses degree, ring degree, the settings' reference horizon.
Rank 0 writes the output."""

from __future__ import annotations

import sys

import torch
from family_calls import wan_animate_2_segments

import lvsa
from lvsa.parallel import enable_context_parallel, exit_process, init_distributed, leave_distributed


def _minimax_h3(folder: str, workflow: str):
    from diffusers import MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel
    from diffusers.modular_pipelines.minimax_h3 import modular_blocks_minimax_h3 as blocks

    core = blocks.MiniMaxH3CoreDenoiseStep if workflow == "t2va" else blocks.MiniMaxH3FL2VACoreDenoiseStep
    pipe = core().init_pipeline()
    pipe.update_components(transformer=MiniMaxH3Transformer3DModel.from_pretrained(folder).eval(),
                           scheduler=MiniMaxH3Scheduler(shift=12.0), audio_scheduler=MiniMaxH3Scheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(folder: str, workflow: str, inputs: str, out: str, ulysses: int, ring: int, horizon: int) -> None:
    rank, _world, _local = init_distributed("cpu")
    try:
        pipe = wan_animate_2_segments(folder) if workflow == "wan-animate-2" else _minimax_h3(folder, workflow)
        enable_context_parallel(pipe, ulysses, ring_degree=ring)
        handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="error", reference_latent_frames=horizon))
        kwargs = torch.load(inputs)
        with torch.inference_mode():
            latents = pipe(**kwargs, generator=torch.Generator().manual_seed(1), output="latents")
        if rank == 0:
            torch.save({"latents": latents, "sparse_calls": handle.stats.sparse_calls,
                        "plan_builds": handle.stats.plan_builds}, out)
    finally:
        leave_distributed()


if __name__ == "__main__":
    folder, workflow, inputs, out, ulysses, ring, horizon = sys.argv[1:8]
    main(folder, workflow, inputs, out, int(ulysses), int(ring), int(horizon))
    exit_process(0)
