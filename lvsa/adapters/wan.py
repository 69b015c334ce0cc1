"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): ``WanTransformer3DModel``.

Self-attention is ``blocks[i].attn1`` over video tokens only (no text in the sequence); ``attn2`` is the
text (and, for I2V, image) cross-attention and stays dense. RoPE is applied inside the processor from the
``(cos, sin)`` tables of ``transformer.rope``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..geometry import FAMILIES, ModelFamily
from ..riflex import TemporalRope
from .base import LVSAProcessor, ModelAdapter, rewrite_rope_output

if TYPE_CHECKING:
    import torch

    from .runtime import LVSARuntime

_WAN_ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default; the transformer never passes another
_TI2V_5B_CHANNELS = 48  # the 5B model's latent channels (its VAE is 16x spatial)


def qkv_projections(attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if getattr(attn, "fused_projections", False):
        return tuple(attn.to_qkv(hidden_states).chunk(3, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``[B, S, H, D]`` with interleaved ``(cos, sin)`` tables (same arithmetic as diffusers)."""
    import torch

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanLVSAProcessor(LVSAProcessor):
    """Wan self-attention through lvsa; anything lvsa cannot plan goes to the original processor."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plan = None
        if encoder_hidden_states is None and attention_mask is None:
            plan = self.plan(hidden_states.shape[1])
        else:
            self.unsupported("unexpected_inputs", hidden_states.shape[1],
                             "attn1 was called with encoder states or a mask")
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        query, key, value = qkv_projections(attn, hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out, _ = self.attend((query, key, value), None, plan)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanAdapter(ModelAdapter):
    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)

    def family(self, transformer: Any) -> ModelFamily:
        if transformer.config.in_channels == _TI2V_5B_CHANNELS:
            return FAMILIES["wan-ti2v-5b"]
        return FAMILIES["wan"]

    def self_attention_layers(self, transformer: Any) -> dict[str, Any]:
        return {f"blocks.{i}.attn1": block.attn1 for i, block in enumerate(transformer.blocks)}

    def make_processor(self, original: Any, runtime: LVSARuntime, layer: str) -> Any:
        return WanLVSAProcessor(original, runtime, layer)

    def temporal_rope(self, transformer: Any) -> TemporalRope:
        return TemporalRope(_WAN_ROPE_THETA, transformer.rope.t_dim)

    def install_riflex(self, transformer: Any, runtime: LVSARuntime) -> list[Any]:
        return [rewrite_rope_output(transformer.rope, runtime, self.temporal_rope(transformer))]
