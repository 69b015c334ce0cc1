"""RIFLEx: let a video model run past its training length by slowing one temporal RoPE frequency.

The temporal RoPE of a video DiT has frequencies ``w_j = theta^(-2j / t_dim)``. RIFLEx picks the one whose
period ``2 pi / w_j`` is closest to the training length ``L`` (in RoPE positions, i.e. latent frames) and
sets it to ``2 pi / (L * s)``, so that it completes at most one period over an ``s`` times longer video.
At ``s = 1`` nothing changes. It costs nothing at run time: only the cos/sin tables change.

Every supported family lays its rotary tables out the same way (``get_1d_rotary_pos_embed`` with real
output): tokens frame-major, the temporal block first, each frequency repeated on two adjacent columns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TemporalRope:
    """Where a model keeps its temporal RoPE: the first ``t_dim`` columns, base ``theta``."""

    theta: float
    t_dim: int


def frequency_index(rope: TemporalRope, training_length: int) -> int:
    """The temporal frequency whose period is closest to ``training_length`` positions."""
    if rope.t_dim < 2:
        raise ConfigError(f"RIFLEx needs a temporal RoPE block of at least 2 columns (t_dim={rope.t_dim})")
    periods = [2 * math.pi * rope.theta ** (2 * j / rope.t_dim) for j in range(rope.t_dim // 2)]
    return min(range(len(periods)), key=lambda j: abs(periods[j] - training_length))


def new_frequency(training_length: int, s: float) -> float:
    return 2 * math.pi / (training_length * s)


def rewrite_tables(
    cos: torch.Tensor,
    sin: torch.Tensor,
    latent_frames: int,
    rope: TemporalRope,
    training_length: int,
    s: float,
    *,
    total_tokens: int | None = None,
    token_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(cos, sin)`` tables with RIFLEx applied (new tensors; the inputs are left alone).

    ``cos``/``sin`` hold one row per video token (any leading or middle singleton axes, last axis the head
    dimension), frame-major: token ``i`` sits at temporal position ``i // (tokens / latent_frames)``. A
    table that holds only a shard of the tokens (context parallelism) gives ``total_tokens`` and the index
    of its first row, ``token_offset``."""
    if s <= 0:
        raise ConfigError(f"riflex_s={s}: must be > 0")
    if s == 1:
        return cos, sin
    head_dim = cos.shape[-1]
    tokens = cos.numel() // head_dim
    total = total_tokens or tokens
    if total % latent_frames:
        raise ConfigError(f"RIFLEx: {total} rotary rows do not split into {latent_frames} latent frames")
    k = frequency_index(rope, training_length)
    import torch

    rows = torch.arange(token_offset, token_offset + tokens, device=cos.device, dtype=torch.float64)
    positions = rows // (total // latent_frames)
    angle = positions * new_frequency(training_length, s)
    shape = cos.shape
    cos, sin = cos.reshape(tokens, head_dim).clone(), sin.reshape(tokens, head_dim).clone()
    columns = slice(2 * k, 2 * k + 2)
    cos[:, columns] = angle.cos().to(cos.dtype)[:, None]
    sin[:, columns] = angle.sin().to(sin.dtype)[:, None]
    return cos.reshape(shape), sin.reshape(shape)
