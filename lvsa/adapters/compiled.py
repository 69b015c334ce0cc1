"""lvsa's per-forward and per-layer work as torch custom ops, for transformers run under ``torch.compile``.

Planning reads and writes Python state that changes every denoising step (the step, the plan cache, the
statistics) and builds index tensors with host work. Traced by dynamo, that state would become guards (a
recompilation per rotated plan) and the host work graph breaks. Behind these two ops the compiled graph sees
only tensors in and tensors out, with shapes that do not change between steps:

- ``lvsa::forward_start`` runs the transformer's forward pre-hook work (step tracking, the context of the
  forward, the processors check) for the forward's grid (two ints, read off the call's shapes while
  tracing) and writes the step into the installation's ``ticket``, a one-element tensor;
- ``lvsa::attention`` takes the ``ticket`` (so the compiled graph orders it after ``forward_start`` and never
  drops either) and the layer's key (a tensor: the same graph serves every block), and calls the executor
  (:func:`lvsa.attention.execute`) with the forward's context, which plans the layer there. A layer that
  cannot be planned runs dense attention over the same queries, keys and values after the usual
  ``[LVSA-FALLBACK]`` line (the model's own processor is not callable from inside an op).

Outside ``torch.compile`` the processors and the hook call the executor directly."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..attention import AttentionContext, execute
from ..geometry import LatentGrid

_installations: weakref.WeakValueDictionary[int, CompiledCalls] = weakref.WeakValueDictionary()
_keys = itertools.count(1)


class DeferredPlan:
    """The plan a layer gets while dynamo traces: planned at run time, inside the ``lvsa::attention`` op."""

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED = DeferredPlan()


class CompiledCalls:
    """What the ops of one lvsa installation reach through its key (an int is what a compiled graph can hold
    as a constant): the forward pre-hooks' work per transformer, the layers' names, and the context of the
    forward being run (``context()``)."""

    def __init__(self, context: Callable[[], AttentionContext]) -> None:
        self.context = context
        self.key = next(_keys)
        _installations[self.key] = self
        with torch.inference_mode(False):  # mutated inside inference_mode and outside it alike
            self.ticket = torch.zeros(1, dtype=torch.int64)
        #: per transformer (in the handle's order): the forward pre-hook's work on the forward's grid and
        #: timestep, returning the step
        self.forward_callbacks: list[Callable[[LatentGrid, Any], int]] = []
        self.layer_names: list[str] = []  # indexed by the layers' keys

    def layer_key(self, name: str) -> torch.Tensor:
        """A one-element tensor naming layer ``name`` for the ``lvsa::attention`` op."""
        self.layer_names.append(name)
        with torch.inference_mode(False):
            return torch.tensor([len(self.layer_names) - 1], dtype=torch.int64)


def _installation(key: int) -> CompiledCalls:
    found = _installations.get(key)
    if found is None:
        raise RuntimeError(f"lvsa op: installation {key} no longer exists (the model's lvsa installation was dropped)")
    return found


@torch.library.custom_op("lvsa::forward_start", mutates_args=("ticket",))
def forward_start(ticket: torch.Tensor, latent_frames: int, patches_per_frame: int, timestep: torch.Tensor | None,
                  installation_key: int, transformer_index: int) -> None:
    grid = LatentGrid(latent_frames, patches_per_frame)
    step = _installation(installation_key).forward_callbacks[transformer_index](grid, timestep)
    ticket.fill_(step)


@forward_start.register_fake
def _(ticket, latent_frames, patches_per_frame, timestep, installation_key, transformer_index) -> None:
    return None


@torch.library.custom_op("lvsa::attention", mutates_args=())
def attention(ticket: torch.Tensor, layer_key: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              text_q: torch.Tensor | None, text_k: torch.Tensor | None, text_v: torch.Tensor | None,
              key_padding_mask: torch.Tensor | None, installation_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    installation = _installation(installation_key)
    layer = installation.layer_names[int(layer_key)]
    text = None if text_q is None else (text_q, text_k, text_v)
    video_out, text_out = execute(installation.context(), layer, (q, k, v), text, key_padding_mask)
    # an op's outputs have the strides its fake says (its inputs': a processor may hand in transposed views),
    # never share storage, and are never None
    video = video_out if video_out.stride() == q.stride() else torch.empty_like(q).copy_(video_out)
    if text_out is None:
        return video, q.new_empty(0)
    return video, torch.empty_like(text_q).copy_(text_out)


@attention.register_fake
def _(ticket, layer_key, q, k, v, text_q, text_k, text_v, key_padding_mask, installation_key):
    return torch.empty_like(q), (q.new_empty(0) if text_q is None else torch.empty_like(text_q))


def compiling() -> bool:
    """True while dynamo traces: the hook and the processors then go through the ops above."""
    return torch.compiler.is_compiling()


def as_tensor(timestep: Any) -> torch.Tensor | None:
    """The op takes a tensor timestep; a Python number (a custom loop's) becomes one."""
    if timestep is None or isinstance(timestep, torch.Tensor):
        return timestep
    return torch.tensor(float(timestep))
