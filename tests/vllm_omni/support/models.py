"""Test support: vLLM-Omni's own Wan transformer, small and with random weights, ready to run on CPU (the
process group of one gloo rank vLLM-Omni's parallel layers need, vLLM's config around construction, weights
processed as vLLM's loader would)."""

from __future__ import annotations

import os
import socket

import torch

SMALL_WAN = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8,
                 freq_dim=32, ffn_dim=16, num_layers=2, rope_max_seq_len=256)


def one_process_group() -> None:
    """vLLM-Omni's model-parallel groups over one gloo rank (once per process)."""
    import torch.distributed as dist
    from vllm_omni.diffusion.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                 distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
    initialize_model_parallel(backend="gloo")


def vllm_config():
    from vllm.config import VllmConfig

    return VllmConfig()


def small_wan(served, seed: int = 0, **overrides):
    """vLLM-Omni's ``WanTransformer3DModel`` built under ``served`` (an ``OmniDiffusionConfig``)."""
    from vllm.config import set_current_vllm_config
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.diffusion.forward_context import set_forward_context
    from vllm_omni.diffusion.models.wan2_2.wan2_2_transformer import WanTransformer3DModel

    one_process_group()
    # the attention layers choose their sequence-parallel strategy from the forward context they are built in
    with set_current_diffusion_config(served), set_current_vllm_config(vllm_config()), \
            set_forward_context(omni_diffusion_config=served):
        model = WanTransformer3DModel(**{**SMALL_WAN, **overrides})
    return _random_weights(model, seed)


def forward(model, served, latents, step: int, timestep: float = 500.0, text=None):
    """One forward of the transformer at denoising ``step``, as vLLM-Omni's pipelines run it."""
    from vllm.config import set_current_vllm_config
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.diffusion.forward_context import set_forward_context, set_forward_context_denoise_step_idx

    text = text if text is not None else torch.ones(latents.shape[0], 5, 8)
    with torch.no_grad(), set_current_diffusion_config(served), set_current_vllm_config(vllm_config()), \
            set_forward_context(omni_diffusion_config=served):
        set_forward_context_denoise_step_idx(step)
        out = model(latents, torch.tensor([timestep]), text, return_dict=False)
    return out[0] if isinstance(out, tuple) else out


SMALL_HUNYUAN = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                     num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                     text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(8, 4, 4), target_size=16,
                     task_type="t2v")


def small_hunyuan(served, seed: int = 0):
    """vLLM-Omni's ``HunyuanVideo15Transformer3DModel`` built under ``served``, random weights."""
    from vllm.config import set_current_vllm_config
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.diffusion.forward_context import set_forward_context
    from vllm_omni.diffusion.models.hunyuan_video.hunyuan_video_15_transformer import (
        HunyuanVideo15Transformer3DModel,
    )

    one_process_group()
    with set_current_diffusion_config(served), set_current_vllm_config(vllm_config()), \
            set_forward_context(omni_diffusion_config=served):
        model = HunyuanVideo15Transformer3DModel(served, **SMALL_HUNYUAN)
    return _random_weights(model, seed)


def _random_weights(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.1)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    return model.eval()


def hunyuan_forward(model, served, latents, timestep: float, kept_text=(6, 3), seed: int = 2,
                    sp_hooks: bool = False):
    """One forward with padded text: batch entry i keeps the first ``kept_text[i]`` of 6 text tokens
    (``sp_hooks``: the model's sequence-parallel hooks are applied)."""
    from vllm.config import set_current_vllm_config
    from vllm_omni.diffusion.config import set_current_diffusion_config
    from vllm_omni.diffusion.forward_context import set_forward_context

    gen = torch.Generator().manual_seed(seed)
    batch = latents.shape[0]
    text = torch.randn(batch, 6, SMALL_HUNYUAN["text_embed_dim"], generator=gen)
    mask = (torch.arange(6)[None] < torch.tensor(kept_text[:batch])[:, None]).long()
    text_2 = torch.randn(batch, 3, SMALL_HUNYUAN["text_embed_2_dim"], generator=gen)
    image = torch.zeros(batch, 2, SMALL_HUNYUAN["image_embed_dim"])
    with torch.no_grad(), set_current_diffusion_config(served), set_current_vllm_config(vllm_config()), \
            set_forward_context(omni_diffusion_config=served):
        if sp_hooks:
            from vllm_omni.diffusion.forward_context import get_forward_context

            get_forward_context().sp_plan_hooks_applied = True
        out = model(latents, torch.tensor([timestep] * batch), text, mask, encoder_hidden_states_2=text_2,
                    encoder_attention_mask_2=torch.ones(batch, 3, dtype=torch.long), image_embeds=image,
                    return_dict=False)
    return out[0] if isinstance(out, tuple) else out
