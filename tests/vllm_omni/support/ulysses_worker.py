"""Test support: one rank of vLLM-Omni's Wan transformer under Ulysses sequence parallelism over gloo, lvsa as its
self-attention backend (run by torchrun from test_ulysses.py). Rank 0 saves the output at each step given."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "stand_ins"))

import torch  # noqa: E402
import vllm_omni.platforms  # noqa: E402
from cpu_platform import CpuTestOmniPlatform  # noqa: E402

vllm_omni.platforms._current_omni_platform = CpuTestOmniPlatform()


def main(out: str, model_name: str, frames: int, height: int, width: int, steps: list[int]) -> None:
    from models import hunyuan_forward, small_hunyuan, small_wan
    from vllm.config import set_current_vllm_config
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.diffusion.data import AttentionConfig, AttentionSpec, DiffusionParallelConfig, OmniDiffusionConfig
    from vllm_omni.diffusion.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm_omni.diffusion.distributed.sp_plan import SequenceParallelConfig, get_sp_plan_from_model
    from vllm_omni.diffusion.forward_context import set_forward_context, set_forward_context_denoise_step_idx
    from vllm_omni.diffusion.hooks.sequence_parallel import apply_sequence_parallel

    from lvsa_vllm_omni.host import host
    from lvsa_vllm_omni.plugin import register

    register()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo")
    initialize_model_parallel(sequence_parallel_size=world, ulysses_degree=world, backend="gloo")
    served = OmniDiffusionConfig(
        model_class_name="HunyuanVideo15Pipeline" if model_name == "hunyuan" else "Wan22Pipeline",
        diffusion_attention_config=AttentionConfig(per_role={"self": AttentionSpec(backend="LVSA")}),
        parallel_config=DiffusionParallelConfig(sequence_parallel_size=world, ulysses_degree=world))
    model = small_hunyuan(served) if model_name == "hunyuan" else small_wan(served)
    from vllm.config import VllmConfig

    with set_current_vllm_config(VllmConfig()), set_current_diffusion_config(served), \
            set_forward_context(omni_diffusion_config=served):
        apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=world), get_sp_plan_from_model(model))
    if model_name == "hunyuan":  # text after the video, padded in one of two batch entries; steps from timesteps
        latents = torch.randn(2, 9, frames, height, width, generator=torch.Generator().manual_seed(1))
        outputs = [hunyuan_forward(model, served, latents, 900.0 - 100 * step, sp_hooks=True) for step in steps]
        steps = []
    else:
        latents = torch.randn(1, 4, frames, height, width, generator=torch.Generator().manual_seed(1))
        outputs = []
    for step in steps:
        with torch.no_grad(), set_current_vllm_config(VllmConfig()), set_current_diffusion_config(served), \
                set_forward_context(omni_diffusion_config=served):
            from vllm_omni.diffusion.forward_context import get_forward_context

            get_forward_context().sp_plan_hooks_applied = True
            set_forward_context_denoise_step_idx(step)
            result = model(latents, torch.tensor([500.0]), torch.ones(1, 5, 8), return_dict=False)
        outputs.append(result[0] if isinstance(result, tuple) else result)
    if rank == 0:
        torch.save({"outputs": outputs, "sparse_calls": host().stats.sparse_calls,
                    "fallback_calls": host().stats.fallback_calls}, out)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         [int(s) for s in sys.argv[6].split(",")])
