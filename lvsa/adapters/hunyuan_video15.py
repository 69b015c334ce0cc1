"""HunyuanVideo 1.5 (T2V, I2V): ``HunyuanVideo15Transformer3DModel``.

Joint attention in ``transformer_blocks[i].attn``: the sequence is the video tokens followed by the text
tokens (image, byT5 and Qwen embeddings, valid ones first); the layer gets a ``[batch, text]`` padding
mask, which lvsa honours on the text keys. The text-only refiner attention stays as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..geometry import FAMILIES, ModelFamily
from ..riflex import TemporalRope
from .base import LVSAProcessor, ModelAdapter, rewrite_rope_output

if TYPE_CHECKING:
    import torch

    from .runtime import LVSARuntime


class HunyuanVideo15LVSAProcessor(LVSAProcessor):

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.embeddings import apply_rotary_emb

        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        plan = self.plan(hidden_states.shape[1], text)
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        heads = attn.heads
        query, key, value = (proj(hidden_states).unflatten(2, (heads, -1))
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_qkv, padding = None, None
        if text:
            text_q, text_k, text_v = (proj(encoder_hidden_states).unflatten(2, (heads, -1))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            text_qkv = (text_q, text_k, text_v)
            if attention_mask is not None:
                padding = attention_mask[:, -text:].bool()
        video, text_out = self.attend((query, key, value), text_qkv, plan, padding)
        video = video.flatten(2, 3).to(query.dtype)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if text_out is None:
            return video, encoder_hidden_states
        text_out = text_out.flatten(2, 3).to(query.dtype)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video, text_out


class HunyuanVideo15Adapter(ModelAdapter):
    name = "hunyuan"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)

    def family(self, transformer: Any) -> ModelFamily:
        return FAMILIES["hunyuan"]

    def self_attention_layers(self, transformer: Any) -> dict[str, Any]:
        return {f"transformer_blocks.{i}.attn": block.attn for i, block in enumerate(transformer.transformer_blocks)}

    def make_processor(self, original: Any, runtime: LVSARuntime, layer: str) -> Any:
        return HunyuanVideo15LVSAProcessor(original, runtime, layer)

    def cp_plan(self, transformer: Any) -> dict[str, Any]:
        # diffusers ships none for this model: shard the video tokens and their rotary tables, keep the text
        # whole on every rank (lvsa's processor takes its heads), gather after the last projection
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        rows = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        return {
            "rope": {0: rows, 1: rows},
            "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    def temporal_rope(self, transformer: Any) -> TemporalRope:
        return TemporalRope(float(transformer.rope.theta), transformer.rope.rope_dim[0])

    def install_riflex(self, transformer: Any, runtime: LVSARuntime) -> list[Any]:
        return [rewrite_rope_output(transformer.rope, runtime, self.temporal_rope(transformer))]
