"""CogVideoX (2B, 5B, 1.5): ``CogVideoXTransformer3DModel``.

Joint attention in ``transformer_blocks[i].attn1``: the text tokens come first, then the video tokens.
The stock processor calls ``F.scaled_dot_product_attention`` directly, so diffusers' attention backends
never see it; lvsa replaces the processor. RoPE (5B and 1.5 only) is computed by the pipeline and passed
to the transformer as ``image_rotary_emb``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..geometry import FAMILIES, ModelFamily
from ..riflex import TemporalRope
from .base import LVSAProcessor, ModelAdapter, riflex_tables

if TYPE_CHECKING:
    import torch

    from .runtime import LVSARuntime

_COG_ROPE_THETA = 10000.0  # get_3d_rotary_pos_embed's default, which the pipeline uses


class CogVideoXLVSAProcessor(LVSAProcessor):

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.size(1)
        plan = None
        if attention_mask is None:
            plan = self.plan(hidden_states.shape[1], text)
        else:
            self.unsupported("attention_mask", hidden_states.shape[1], "CogVideoX was given a full attention mask",
                             text)
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        head_dim = attn.inner_dim // attn.heads

        def project(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            batch = states.shape[0]
            q, k, v = (proj(states).view(batch, -1, attn.heads, head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            return q, k, v

        video_q, video_k, video_v = project(hidden_states)
        if image_rotary_emb is not None:
            video_q = apply_rotary_emb(video_q, image_rotary_emb, sequence_dim=1)
            video_k = apply_rotary_emb(video_k, image_rotary_emb, sequence_dim=1)
        video, text_out = self.attend((video_q, video_k, video_v), project(encoder_hidden_states), plan)
        video, text_out = (attn.to_out[1](attn.to_out[0](t.flatten(2, 3))) for t in (video, text_out))
        return video, text_out


class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    forward_positions: ClassVar[dict[str, int]] = {"hidden_states": 0, "timestep": 2}
    latent_axes: ClassVar[tuple[int, int, int]] = (1, 3, 4)  # CogVideoX latents are [B, F, C, H, W]

    def family(self, transformer: Any) -> ModelFamily:
        # CogVideoX 1.5 is the variant that patches time, with its own (longer) documented horizon
        return FAMILIES["cogvideox-1.5" if self.temporal_patch(transformer) > 1 else "cogvideox"]

    def self_attention_layers(self, transformer: Any) -> dict[str, Any]:
        return {f"transformer_blocks.{i}.attn1": b.attn1 for i, b in enumerate(transformer.transformer_blocks)}

    def make_processor(self, original: Any, runtime: LVSARuntime, layer: str) -> Any:
        return CogVideoXLVSAProcessor(original, runtime, layer)

    def cp_plan(self, transformer: Any) -> dict[str, Any]:
        # diffusers ships none for this model: shard the video tokens and the rotary tables the pipeline
        # passes in, keep the text whole on every rank, gather after the last projection
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        plan: dict[str, Any] = {
            "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }
        if transformer.config.use_rotary_positional_embeddings:
            rows = ContextParallelInput(split_dim=0, expected_dims=2)
            plan[""] = {"image_rotary_emb": [rows, rows]}
        return plan

    def temporal_rope(self, transformer: Any) -> TemporalRope | None:
        if not transformer.config.use_rotary_positional_embeddings:
            return None
        return TemporalRope(_COG_ROPE_THETA, transformer.config.attention_head_dim // 4)

    def install_riflex(self, transformer: Any, runtime: LVSARuntime) -> list[Any]:
        rope = self.temporal_rope(transformer)
        if rope is None:
            from ..errors import ConfigError

            raise ConfigError("RIFLEx needs RoPE, and this CogVideoX model has none "
                              "(use_rotary_positional_embeddings=False, e.g. CogVideoX-2B)")

        def rewrite(_module: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
            tables = kwargs.get("image_rotary_emb")
            if tables is None:
                return None
            return args, {**kwargs, "image_rotary_emb": riflex_tables(runtime, *tables, rope)}

        return [transformer.register_forward_pre_hook(rewrite, with_kwargs=True)]
