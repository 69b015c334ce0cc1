"""Run under ``torchrun`` by tests/test_context_parallel.py: every family's saved small pipeline, context-parallel
(Ulysses over all ranks, gloo) with each CPU driver; rank 0 saves the latents. Not a test module itself."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed

import lvsa
from lvsa.adapters import adapter_named
from lvsa.parallel import enable_context_parallel, init_distributed
from lvsa_app.generation import _load_pipeline
from lvsa_app.models import example_model


def main(models: Path, out: Path, families: list[str], backends: list[str], frames: dict[str, int]) -> None:
    rank, world, _ = init_distributed("cpu")
    for name in families:
        adapter = adapter_named(name)
        example = example_model(adapter.name)
        pipe = _load_pipeline(adapter, str(models / name), torch.float32)
        pipe.set_progress_bar_config(disable=True)
        enable_context_parallel(pipe, world)
        for backend in backends:
            handle = lvsa.apply(pipe, lvsa.LVSASettings(backend=backend))
            call = {**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0),
                    "height": 64, "width": 64, "num_frames": frames[name], "num_inference_steps": 2,
                    "generator": torch.Generator().manual_seed(0), "output_type": "latent"}
            with torch.inference_mode():
                latent = pipe(**call).frames
            if rank == 0:
                torch.save({"latent": latent, "ulysses_degree": handle.stats.ulysses_degree,
                            "collective_backend": torch.distributed.get_backend(),
                            "sparse_calls": handle.stats.sparse_calls, "density": handle.runtime.last_plan.density},
                           out / f"{name}-{backend}.pt")


if __name__ == "__main__":
    models_dir, out_dir, families_arg, backends_arg, frames_arg = sys.argv[1:6]
    frame_counts = dict((k, int(v)) for k, v in (item.split("=") for item in frames_arg.split(",")))
    main(Path(models_dir), Path(out_dir), families_arg.split(","), backends_arg.split(","), frame_counts)
