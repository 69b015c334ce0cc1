"""Run under ``torchrun`` by tests/test_context_parallel.py: every family's saved small pipeline, context-parallel
(Ulysses x ring over all ranks, gloo) with each CPU driver; rank 0 saves the latents, every rank its ring
counts. Not a test module itself."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed

import lvsa
from lvsa.adapters import adapter_named
from lvsa.parallel import enable_context_parallel, exit_process, init_distributed, leave_distributed
from lvsa_app.generation import load_pipeline
from lvsa_app.models import example_model


def main(models: Path, out: Path, families: list[str], backends: list[str], frames: dict[str, int],
         ulysses: int, ring: int, sparsity_scale: float) -> None:
    rank, _, _ = init_distributed("cpu")
    for name in families:
        adapter = adapter_named(name)
        example = example_model(adapter.name)
        pipe = load_pipeline(adapter, str(models / name), torch.float32)
        pipe.set_progress_bar_config(disable=True)
        enable_context_parallel(pipe, ulysses, ring_degree=ring)
        for backend in backends:
            handle = lvsa.apply(pipe, lvsa.LVSASettings(backend=backend, sparsity_scale=sparsity_scale))
            call = {**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0),
                    "height": 64, "width": 64, "num_frames": frames[name], "num_inference_steps": 2,
                    "generator": torch.Generator().manual_seed(0), "output_type": "latent"}
            with torch.inference_mode():
                latent = pipe(**call).frames
            stats = handle.stats
            torch.save({"latent": latent if rank == 0 else None, "ulysses_degree": stats.ulysses_degree,
                        "ring_degree": stats.ring_degree, "ring_steps": stats.ring_steps,
                        "ring_steps_skipped": stats.ring_steps_skipped,
                        "last_skipped_key_shards": stats.last_skipped_key_shards, "plan": handle.runtime.last_plan,
                        "collective_backend": torch.distributed.get_backend(),
                        "sparse_calls": stats.sparse_calls, "density": handle.runtime.last_plan.density},
                       out / f"{name}-{backend}-rank{rank}.pt")
            lvsa.remove(pipe)
    leave_distributed()


if __name__ == "__main__":
    models_dir, out_dir, families_arg, backends_arg, frames_arg, ulysses_arg, ring_arg, scale_arg = sys.argv[1:9]
    frame_counts = dict((k, int(v)) for k, v in (item.split("=") for item in frames_arg.split(",")))
    main(Path(models_dir), Path(out_dir), families_arg.split(","), backends_arg.split(","), frame_counts,
         int(ulysses_arg), int(ring_arg), float(scale_arg))
    exit_process(0)
