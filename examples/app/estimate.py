"""What a generation will cost, said before it starts: tokens, attention FLOPs per denoising step with and
without lvsa, and the memory a run needs at least, against what the device has free.

A run past a device's memory fails late (or, on a CPU, swaps for hours) and a long torch op does not return
to Python to honour Ctrl-C or SIGTERM until it ends, so the time to say "this will not fit" is before the first
step. The numbers are lower bounds from the model's config, not measurements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1 << 30


@dataclass(frozen=True)
class RunEstimate:
    video_tokens: int  # per sequence
    sequences: int  # per denoising step: the videos, twice with classifier-free guidance
    layers: int
    dense_flops: float  # self-attention FLOPs of one step with the model's dense attention
    sparse_flops: float | None  # the same under lvsa's plan (None: a dense run)
    weight_bytes: int
    activation_bytes: int  # the working set of one transformer block over every sequence of a step
    frame_bytes: int  # the decoded frames as the pipeline returns them (float32), before encoding
    free_bytes: int | None  # what the device has free now

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.frame_bytes

    def lines(self) -> list[str]:
        sparse = (f", {_flops(self.sparse_flops)} with lvsa ({self.sparse_flops / self.dense_flops:.0%})"
                  if self.sparse_flops is not None else "")
        free = f"; {_bytes(self.free_bytes)} free on the device" if self.free_bytes is not None else ""
        return [
            f"estimate: {self.video_tokens:,} video tokens per sequence x {self.sequences} sequences per step "
            f"through {self.layers} layers; self-attention {_flops(self.dense_flops)} per step dense{sparse}",
            f"estimate: at least {_bytes(self.needed_bytes)} (weights {_bytes(self.weight_bytes)}, one block's "
            f"activations {_bytes(self.activation_bytes)}, decoded frames {_bytes(self.frame_bytes)}){free}",
        ]

    def shortfall(self) -> str:
        return (f"this run needs at least {_bytes(self.needed_bytes)} but the device has "
                f"{_bytes(self.free_bytes or 0)} free")

    @property
    def too_large(self) -> bool:
        return self.free_bytes is not None and self.needed_bytes > self.free_bytes


def estimate_run(transformer: Any, adapter: Any, *, video_tokens: int, sequences: int, density: float | None,
                 frames: int, height: int, width: int, output_latent: bool, free_bytes: int | None) -> RunEstimate:
    """The estimate for ``sequences`` sequences of ``video_tokens`` per step through ``transformer`` (a diffusers
    model whose video self-attention layers ``adapter`` finds: their count, and the width of their query
    projection; the feed-forward width from its config), ``density`` being the plan's (``None`` for dense
    attention)."""
    config = transformer.config
    attention = adapter.self_attention_layers(transformer)
    layers = len(attention)
    hidden = _query_width(next(iter(attention.values())))
    ffn = getattr(config, "ffn_dim", None) or int(hidden * getattr(config, "mlp_ratio", 4.0))
    # QK^T and PV: 2 multiply-adds of S x S x D per head = 4 S^2 H D FLOPs per layer and sequence
    dense = 4.0 * video_tokens**2 * hidden * layers * sequences
    parameter = next(transformer.parameters(), None)
    element = parameter.element_size() if parameter is not None else 4
    weights = sum(p.numel() * p.element_size() for p in transformer.parameters())
    # q, k, v, attention output, residual and norm (6 x hidden), plus the feed-forward's inner width
    activations = sequences * video_tokens * (6 * hidden + ffn) * element
    decoded = 0 if output_latent else frames * height * width * 3 * 4
    return RunEstimate(video_tokens, sequences, layers, dense, None if density is None else dense * density,
                       weights, activations, decoded, free_bytes)


def _query_width(layer: Any) -> int:
    """Heads x head size of an attention layer: diffusers' ``inner_dim``, else its query projection's output
    (``to_query`` in Kandinsky 5's layers; a fused ``to_qkv`` holds three)."""
    if isinstance(getattr(layer, "inner_dim", None), int):
        return layer.inner_dim
    for name, parts in (("to_q", 1), ("to_query", 1), ("to_qkv", 3)):
        projection = getattr(layer, name, None)
        if projection is not None:
            return projection.out_features // parts
    raise ValueError(f"{type(layer).__name__}: no query projection to size the attention by")


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value / 1e6:,.1f} MFLOP"


def _bytes(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if value >= 1 << shift:
            return f"{value / (1 << shift):,.1f} {unit}"
    return f"{value / 1024:,.1f} KiB"
