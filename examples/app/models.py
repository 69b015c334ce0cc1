"""The example pipelines of each model family: a small pipeline of the family's architecture with random
weights (built from a config, nothing downloaded), the prompt arguments of a call (random prompt embeddings
when the pipeline has no text encoder), and the family's call arguments. The example scripts and the tests
use them; the library (``lvsa``) does not."""

from __future__ import annotations

from typing import Any


class ExampleModel:
    """What the example application needs of a model family, beside lvsa's adapter."""

    #: diffusers' pipeline class, when a checkpoint folder's model_index.json does not name one
    pipeline_class: str

    def tiny_pipeline(self) -> Any:
        """A small pipeline of this architecture with random weights (no text encoder, no download)."""
        raise NotImplementedError

    def pipeline_inputs(self, pipe: Any, prompt: str | None, seed: int) -> dict[str, Any]:
        """Prompt arguments for a pipeline call: the prompt when the pipeline has a text encoder, else
        random prompt embeddings of the right shape."""
        raise NotImplementedError

    def call_arguments(self, pipe: Any, guidance: float) -> dict[str, Any]:
        """Family-specific pipeline call arguments (guidance, ...)."""
        return {"guidance_scale": guidance}


class WanExample(ExampleModel):
    pipeline_class = "WanPipeline"

    def tiny_pipeline(self) -> Any:
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
        return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)

    def pipeline_inputs(self, pipe: Any, prompt: str | None, seed: int) -> dict[str, Any]:
        if pipe.text_encoder is not None:
            return {"prompt": prompt or "", "negative_prompt": ""}
        import torch

        generator = torch.Generator().manual_seed(seed)
        width = pipe.transformer.config.text_dim
        return {name: torch.randn(1, 16, width, generator=generator)
                for name in ("prompt_embeds", "negative_prompt_embeds")}


class HunyuanVideo15Example(ExampleModel):
    pipeline_class = "HunyuanVideo15Pipeline"

    def tiny_pipeline(self) -> Any:
        from diffusers import (
            AutoencoderKLHunyuanVideo15,
            FlowMatchEulerDiscreteScheduler,
            HunyuanVideo15Pipeline,
            HunyuanVideo15Transformer3DModel,
        )
        from diffusers.guiders import ClassifierFreeGuidance

        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=9, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
            text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(8, 4, 4), target_size=16, task_type="t2v",
        )
        vae = AutoencoderKLHunyuanVideo15(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16, 16),
            layers_per_block=1, spatial_compression_ratio=16, temporal_compression_ratio=4,
            downsample_match_channel=False, upsample_match_channel=False,
        )
        return HunyuanVideo15Pipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            guider=ClassifierFreeGuidance(guidance_scale=6.0),
        )

    def pipeline_inputs(self, pipe: Any, prompt: str | None, seed: int) -> dict[str, Any]:
        if pipe.text_encoder is not None:
            return {"prompt": prompt or "", "negative_prompt": ""}
        import torch

        generator = torch.Generator().manual_seed(seed)
        config = pipe.transformer.config
        inputs: dict[str, Any] = {}
        # 12 text tokens of which 9 valid, 8 byT5 tokens of which 5 valid: the padding mask matters
        for prefix in ("", "negative_"):
            inputs[f"{prefix}prompt_embeds"] = torch.randn(1, 12, config.text_embed_dim, generator=generator)
            inputs[f"{prefix}prompt_embeds_mask"] = (torch.arange(12) < 9).long()[None]
            inputs[f"{prefix}prompt_embeds_2"] = torch.randn(1, 8, config.text_embed_2_dim, generator=generator)
            inputs[f"{prefix}prompt_embeds_mask_2"] = (torch.arange(8) < 5).long()[None]
        return inputs

    def call_arguments(self, pipe: Any, guidance: float) -> dict[str, Any]:
        pipe.guider.guidance_scale = guidance  # HunyuanVideo 1.5 takes guidance from its guider, not the call
        return {}


class CogVideoXExample(ExampleModel):
    pipeline_class = "CogVideoXPipeline"

    def tiny_pipeline(self) -> Any:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=49, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )
        return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=DDIMScheduler())

    def pipeline_inputs(self, pipe: Any, prompt: str | None, seed: int) -> dict[str, Any]:
        if pipe.text_encoder is not None:
            return {"prompt": prompt or "", "negative_prompt": ""}
        import torch

        generator = torch.Generator().manual_seed(seed)
        config = pipe.transformer.config
        return {name: torch.randn(1, config.max_text_seq_length, config.text_embed_dim, generator=generator)
                for name in ("prompt_embeds", "negative_prompt_embeds")}


class WanBackboneExample(WanExample):
    """Declared families built on Wan's backbone and VAE (Wan VACE, SkyReels-V2): the same small VAE, text
    as random embeddings of the transformer's ``text_dim``."""

    def __init__(self, pipeline_class: str, transformer_class: str, **extra: Any) -> None:
        self.pipeline_class = pipeline_class
        self.transformer_class = transformer_class
        self.extra = extra

    def tiny_pipeline(self) -> Any:
        import diffusers

        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])
        transformer = getattr(diffusers, self.transformer_class)(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, **self.extra)
        scheduler = diffusers.UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True,
                                                      prediction_type="flow_prediction")
        return getattr(diffusers, self.pipeline_class)(tokenizer=None, text_encoder=None, transformer=transformer,
                                                       vae=vae, scheduler=scheduler)

    def pipeline_inputs(self, pipe: Any, prompt: str | None, seed: int) -> dict[str, Any]:
        inputs = super().pipeline_inputs(pipe, prompt, seed)
        if "prompt" not in inputs and "DiffusionForcing" in type(pipe).__name__:
            inputs["prompt"] = None  # diffusion forcing's prompt is positional: None with embeddings
        return inputs


#: by adapter name (the ``lvsa.adapters`` entry point of the family, or the declared family's name)
EXAMPLES: dict[str, ExampleModel] = {
    "wan": WanExample(), "hunyuan": HunyuanVideo15Example(), "cogvideox": CogVideoXExample(),
    "wan-vace": WanBackboneExample("WanVACEPipeline", "WanVACETransformer3DModel", vace_layers=[0],
                                   vace_in_channels=96),
    "skyreels-v2": WanBackboneExample("SkyReelsV2Pipeline", "SkyReelsV2Transformer3DModel"),
}


def example_model(name: str) -> ExampleModel:
    """The example pipelines of the family whose adapter is ``name``."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise KeyError(f"no example pipelines for {name!r}; known: {', '.join(EXAMPLES)}") from None
