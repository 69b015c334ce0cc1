"""Ulysses sequence parallelism: the all-to-alls and the group they run in (the collectives only; setting
it up on a model is :mod:`lvsa.parallel`).

With Ulysses the video sequence is sharded over the ranks between layers, and an all-to-all before
attention gives every rank the whole sequence for ``heads / degree`` of the heads. The frame plan is about
the whole sequence, so it does not change: each rank runs its heads through the same driver, and a second
all-to-all gives the sequence shards back. Text tokens (HunyuanVideo 1.5, CogVideoX) are not sharded: every
rank holds all of them, takes its heads before attention and gathers the heads after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

#: one attention input: (query, key, value), each [batch, seq, heads, head_dim]
QKV = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


@dataclass(frozen=True)
class UlyssesGroup:
    group: Any  # torch.distributed ProcessGroup
    degree: int
    rank: int  # rank inside the group

    def check_heads(self, heads: int, origin: str) -> None:
        if heads % self.degree:
            raise ConfigError(
                f"{origin}: {heads} attention heads do not split over ulysses_degree={self.degree}; "
                f"use a degree that divides {heads}"
            )


def sequence_to_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """``[B, S/n, H, D]`` sequence shards -> ``[B, S, H/n, D]``: the whole sequence for this rank's heads."""
    import torch
    import torch.distributed as dist

    b, s_local, h, d = x.shape
    n = ulysses.degree
    # [n (destination rank), B, S/n, H/n, D]: the chunk for rank r holds its heads
    send = x.reshape(b, s_local, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)
    # received[r] is rank r's sequence shard of my heads
    return received.permute(1, 0, 2, 3, 4).reshape(b, n * s_local, h // n, d)


def heads_to_sequence(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: ``[B, S, H/n, D]`` -> ``[B, S/n, H, D]``."""
    import torch
    import torch.distributed as dist

    b, s, h_local, d = x.shape
    n = ulysses.degree
    send = x.reshape(b, n, s // n, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)
    # received[r] holds rank r's heads for my sequence shard
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h_local, d)


def local_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """This rank's heads of a tensor every rank holds whole (the text tokens)."""
    h = x.shape[2] // ulysses.degree
    return x[:, :, ulysses.rank * h:(ulysses.rank + 1) * h]


def gather_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """``[B, S, H/n, D]`` on every rank -> ``[B, S, H, D]`` on every rank."""
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(ulysses.degree)]
    dist.all_gather(parts, x.contiguous(), group=ulysses.group)
    return torch.cat(parts, dim=2)



def to_heads(video: QKV, text: QKV | None, ulysses: UlyssesGroup) -> tuple[QKV, QKV | None]:
    """Before attention: the video's sequence shards become the whole sequence for this rank's heads; the
    text, which every rank holds whole, is cut to the same heads."""
    video_heads = tuple(sequence_to_heads(t, ulysses) for t in video)
    text_heads = None if text is None else tuple(local_heads(t, ulysses) for t in text)
    return video_heads, text_heads  # type: ignore[return-value]


def to_sequence(video_out: torch.Tensor, text_out: torch.Tensor | None,
                ulysses: UlyssesGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """After attention, the inverse of :func:`to_heads`: the video back to sequence shards with every head,
    the text whole with every head on every rank."""
    return heads_to_sequence(video_out, ulysses), (None if text_out is None else gather_heads(text_out, ulysses))
