"""The example pipelines of each model family: a small pipeline of the family's architecture with random
weights (built from a config, nothing downloaded), the prompt arguments of a call (random prompt embeddings
when the pipeline has no text encoder), and the family's call arguments. The example scripts and the tests
use them; the library (``lvsa``) does not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ExampleModel:
    """What the example application needs of a model family, beside lvsa's adapter."""

    #: diffusers' pipeline class, when a checkpoint folder's model_index.json does not name one
    pipeline_class: str
    #: video frames of a run: with the small model (past its horizon, so lvsa engages), and with a checkpoint
    #: (its family's default length)
    tiny_frames: int
    model_frames: int

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
    tiny_frames, model_frames = 161, 81

    def tiny_pipeline(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

        vae = small_wan_vae()
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
    tiny_frames, model_frames = 257, 121

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
    tiny_frames, model_frames = 97, 49

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

    def __init__(self, pipeline_class: str, transformer_class: str, tiny_frames: int, model_frames: int,
                 **extra: Any) -> None:
        self.pipeline_class = pipeline_class
        self.transformer_class = transformer_class
        self.tiny_frames, self.model_frames = tiny_frames, model_frames
        self.extra = extra

    def tiny_pipeline(self) -> Any:
        import diffusers

        vae = small_wan_vae()
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


class DeclaredExample(ExampleModel):
    """A declared family's text-to-video pipeline: a small one built by ``build``, prompted with the prompt when
    it has a text encoder, else with ``embeddings(generator)`` (random prompt embeddings of its shapes). The
    small model runs past its horizon: ``(2T - 1)`` latent frames of its VAE's ``tiny_vae_temporal``."""

    def __init__(self, family: str, pipeline_class: str, build: Callable[[], Any],
                 embeddings: Callable[[Any], dict[str, Any]], *, tiny_vae_temporal: int = 4,
                 guider: bool = False) -> None:
        from lvsa.families import declared

        horizon = declared(family).model_family()
        self.pipeline_class = pipeline_class
        self.build, self.embeddings, self.guider = build, embeddings, guider
        #: video frames per latent frame of the small pipeline's VAE
        self.tiny_vae_temporal = tiny_vae_temporal
        self.tiny_frames = (2 * horizon.reference_latent_frames - 1) * tiny_vae_temporal + 1
        self.model_frames = horizon.reference_video_frames

    def tiny_pipeline(self) -> Any:
        return self.build()

    def pipeline_inputs(self, pipe: Any, prompt: str | None, seed: int) -> dict[str, Any]:
        if getattr(pipe, "text_encoder", None) is not None:
            return {"prompt": prompt or "", "negative_prompt": ""}
        import torch

        return self.embeddings(torch.Generator().manual_seed(seed))

    def call_arguments(self, pipe: Any, guidance: float) -> dict[str, Any]:
        if self.guider:  # the pipeline takes guidance from its guider, not the call
            pipe.guider.guidance_scale = guidance
            return {}
        return {"guidance_scale": guidance}


# -- the small pipelines of the declared families ------------------------------------------------------
def small_wan_vae() -> Any:
    """Wan's VAE, small (4 frames and 8 x 8 pixels per latent), random weights."""
    import diffusers

    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True])


def _hunyuan_vae() -> Any:
    import diffusers

    return diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                               norm_num_groups=4, mid_block_add_attention=False)


def _ltx() -> Any:
    import diffusers

    ones = (1, 1, 1, 1)
    vae = diffusers.AutoencoderKLLTXVideo(  # 4x time, 4x space
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, *ones), decoder_layers_per_block=(1, *ones),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=ones, patch_size=1)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=32)
    return diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, transformer=transformer)


def _hunyuan_video() -> Any:
    import diffusers

    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, text_embed_dim=32, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6))
    return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer,
                                          vae=_hunyuan_vae(), text_encoder_2=None, tokenizer_2=None,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


#: the small Kandinsky 5 transformer's config (the tests build the bare transformer from it too)
KANDINSKY5_TINY = {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 8, "time_dim": 16,
                   "model_dim": 32, "ff_dim": 32, "num_text_blocks": 1, "num_visual_blocks": 2,
                   "axes_dims": (4, 6, 6)}


def _kandinsky5() -> Any:
    import diffusers

    transformer = diffusers.Kandinsky5Transformer3DModel(**KANDINSKY5_TINY)
    return diffusers.Kandinsky5T2VPipeline(transformer=transformer, vae=_hunyuan_vae(), text_encoder=None,
                                           tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=10.0))


def _mochi() -> Any:
    import diffusers

    # the Mochi VAE's group norms have 32 groups; MochiPipeline decodes 12 latent channels
    vae = diffusers.AutoencoderKLMochi(latent_channels=12, encoder_block_out_channels=(32,) * 4,
                                       decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5,
                                       add_attention_block=(False,) * 5, latents_mean=(0.0,) * 12,
                                       latents_std=(1.0,) * 12)
    transformer = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=32, time_embed_dim=8, max_sequence_length=8)
    return diffusers.MochiPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   tokenizer=None, transformer=transformer)


def _allegro() -> Any:
    import diffusers

    vae = diffusers.AutoencoderKLAllegro(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1,
                                         norm_num_groups=4, sample_size=32)
    transformer = diffusers.AllegroTransformer3DModel(  # the pipeline's RoPE splits the head in three even parts
        patch_size=2, num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=48, sample_height=4, sample_width=4, caption_channels=32)
    return diffusers.AllegroPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=diffusers.EulerAncestralDiscreteScheduler())


def _easyanimate() -> Any:
    import diffusers

    vae = diffusers.AutoencoderKLMagvit(latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1,
                                        norm_num_groups=4)
    transformer = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, num_layers=2,
        mmdit_layers=2, time_embed_dim=8, text_embed_dim=32, sample_width=4, sample_height=4)
    return diffusers.EasyAnimatePipeline(vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
                                         scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _motif() -> Any:
    import diffusers

    transformer = diffusers.MotifVideoTransformer3DModel(  # the latent, its condition and a mask channel
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, patch_size=2, text_embed_dim=32, rope_axes_dim=(4, 6, 6))
    return diffusers.MotifVideoPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=small_wan_vae(),
                                        text_encoder=None, tokenizer=None, transformer=transformer,
                                        guider=diffusers.ClassifierFreeGuidance(guidance_scale=5.0))


def _anyflow() -> Any:
    import diffusers

    transformer = diffusers.AnyFlowTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64)
    return diffusers.AnyFlowPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=small_wan_vae(),
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _ltx2() -> Any:
    import diffusers
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    vae = diffusers.AutoencoderKLLTX2Video(  # 4x time, 4x space
        latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 3, layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 4, spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False), upsample_residual=(False,) * 3, upsample_factor=(1,) * 3,
        patch_size=1)
    heads = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "num_learnable_registers": None}
    streams = {f"{stream}_connector_{k}": v for stream in ("video", "audio") for k, v in heads.items()}
    connectors = LTX2TextConnectors(caption_channels=16, text_proj_in_factor=2, video_hidden_dim=16,
                                    audio_hidden_dim=16, **streams)
    transformer = diffusers.LTX2VideoTransformer3DModel(  # perturbed_attn: the spatio-temporal guidance pass
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=16, audio_out_channels=16, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16, perturbed_attn=True)
    return diffusers.LTX2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        audio_vae=diffusers.AutoencoderKLLTX2Audio(base_channels=16, ch_mult=(1, 2), num_res_blocks=1,
                                                   latent_channels=4, mel_bins=16),
        connectors=connectors, transformer=transformer,
        # the vocoder takes the audio VAE's 2 channels x 16 mel bins
        vocoder=LTX2Vocoder(in_channels=32, hidden_channels=8, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
                            resnet_kernel_sizes=[3], resnet_dilations=[[1]], output_sampling_rate=16000))


def random_prompt_embeddings(generator: Any) -> dict[str, Any]:
    """A prompt and a negative prompt of 8 tokens of width 32, random."""
    import torch

    return {name: torch.randn(1, 8, 32, generator=generator) for name in ("prompt_embeds", "negative_prompt_embeds")}


def _masked_embeddings(generator: Any, valid: int = 8) -> dict[str, Any]:
    """Prompt embeddings with attention masks; the prompt's tokens past ``valid`` are padding."""
    import torch

    mask = torch.ones(1, 8)
    mask[0, valid:] = 0
    return {**random_prompt_embeddings(generator), "prompt_attention_mask": mask,
            "negative_prompt_attention_mask": torch.ones(1, 8)}


def _hunyuan_video_embeddings(generator: Any) -> dict[str, Any]:
    """A padded prompt (its last two tokens masked); HunyuanVideo embeds the guidance, without a negative."""
    import torch

    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 6:] = False
    return {"prompt_embeds": torch.randn(1, 8, 32, generator=generator), "prompt_attention_mask": mask,
            "pooled_prompt_embeds": torch.randn(1, 8, generator=generator)}


def _kandinsky5_embeddings(generator: Any) -> dict[str, Any]:
    """Qwen embeddings with their lengths, and a CLIP vector per prompt."""
    import torch

    lengths = torch.tensor([0, 8], dtype=torch.int32)
    return {"prompt_embeds_qwen": torch.randn(1, 8, 16, generator=generator),
            "negative_prompt_embeds_qwen": torch.randn(1, 8, 16, generator=generator),
            "prompt_embeds_clip": torch.randn(1, 8, generator=generator),
            "negative_prompt_embeds_clip": torch.randn(1, 8, generator=generator),
            "prompt_cu_seqlens": lengths, "negative_prompt_cu_seqlens": lengths}


#: by adapter name (the ``lvsa.adapters`` entry point of the family, or the declared family's name)
EXAMPLES: dict[str, ExampleModel] = {
    "wan": WanExample(), "hunyuan": HunyuanVideo15Example(), "cogvideox": CogVideoXExample(),
    "wan-vace": WanBackboneExample("WanVACEPipeline", "WanVACETransformer3DModel", 161, 81, vace_layers=[0],
                                   vace_in_channels=96),
    "skyreels-v2": WanBackboneExample("SkyReelsV2Pipeline", "SkyReelsV2Transformer3DModel", 193, 97),
    "hunyuan-video": DeclaredExample("hunyuan-video", "HunyuanVideoPipeline", _hunyuan_video,
                                     _hunyuan_video_embeddings),
    "ltx-video": DeclaredExample("ltx-video", "LTXPipeline", _ltx, _masked_embeddings),
    "ltx-2": DeclaredExample("ltx-2", "LTX2Pipeline", _ltx2, _masked_embeddings),
    "kandinsky-5": DeclaredExample("kandinsky-5", "Kandinsky5T2VPipeline", _kandinsky5, _kandinsky5_embeddings),
    # the prompt's last two tokens are padding, which Mochi cuts off per sample
    "mochi": DeclaredExample("mochi", "MochiPipeline", _mochi, lambda g: _masked_embeddings(g, valid=6),
                             tiny_vae_temporal=6),
    # without a prompt, Allegro's default negative prompt ("") must be unset for its embeddings
    "allegro": DeclaredExample("allegro", "AllegroPipeline", _allegro,
                               lambda g: {**_masked_embeddings(g), "negative_prompt": None}),
    "easyanimate": DeclaredExample("easyanimate", "EasyAnimatePipeline", _easyanimate, _masked_embeddings),
    "motif-video": DeclaredExample("motif-video", "MotifVideoPipeline", _motif, _masked_embeddings, guider=True),
    "anyflow": DeclaredExample("anyflow", "AnyFlowPipeline", _anyflow, random_prompt_embeddings),
}


def example_model(name: str) -> ExampleModel:
    """The example pipelines of the family whose adapter is ``name``."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise KeyError(f"no example pipelines for {name!r}; known: {', '.join(EXAMPLES)}") from None
