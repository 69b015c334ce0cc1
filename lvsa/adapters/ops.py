"""lvsa's per-forward and per-layer work as torch custom ops, for transformers run under ``torch.compile``.

Planning reads and writes Python state that changes every denoising step (the step, the plan cache, the
statistics) and builds index tensors with host work. Traced by dynamo, that state would become guards (a
recompilation per rotated plan) and the host work graph breaks. Behind these two ops the compiled graph sees
only tensors in and tensors out, with shapes that do not change between steps:

- ``lvsa::forward_start`` runs the transformer's forward pre-hook work (step tracking, the latent grid,
  the processors check) and writes the step into the runtime's ``ticket``, a one-element tensor;
- ``lvsa::attention`` takes the ``ticket`` (so the compiled graph orders it after ``forward_start`` and never
  drops either) and the layer's key (a tensor: the same graph serves every block), plans the layer and runs
  the attention. A layer that cannot be planned runs dense attention
  over the same queries, keys and values after the usual ``[LVSA-FALLBACK]`` line (the model's own processor
  is not callable from inside an op).

Outside ``torch.compile`` the processors and the hook call the runtime directly; both paths share its code."""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runtime import LVSARuntime

_runtimes: weakref.WeakValueDictionary[int, LVSARuntime] = weakref.WeakValueDictionary()
_keys = itertools.count(1)


class DeferredPlan:
    """The plan a layer gets while dynamo traces: planned at run time, inside the ``lvsa::attention`` op."""

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED = DeferredPlan()


def register(runtime: LVSARuntime) -> int:
    """A key under which the ops find ``runtime`` (an int is what a compiled graph can hold as a constant)."""
    key = next(_keys)
    _runtimes[key] = runtime
    return key


def _runtime(key: int) -> LVSARuntime:
    runtime = _runtimes.get(key)
    if runtime is None:
        raise RuntimeError(f"lvsa op: runtime {key} no longer exists (the model's lvsa installation was dropped)")
    return runtime


@torch.library.custom_op("lvsa::forward_start", mutates_args=("ticket",))
def forward_start(ticket: torch.Tensor, hidden_states: torch.Tensor, timestep: torch.Tensor | None,
                  runtime_key: int, transformer_index: int) -> None:
    runtime = _runtime(runtime_key)
    runtime.forward_callbacks[transformer_index](hidden_states, timestep)
    ticket.fill_(runtime.step)


@forward_start.register_fake
def _(ticket, hidden_states, timestep, runtime_key, transformer_index) -> None:
    return None


@torch.library.custom_op("lvsa::attention", mutates_args=())
def attention(ticket: torch.Tensor, layer_key: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              text_q: torch.Tensor | None, text_k: torch.Tensor | None, text_v: torch.Tensor | None,
              key_padding_mask: torch.Tensor | None, runtime_key: int,
              text_position: str) -> tuple[torch.Tensor, torch.Tensor]:
    runtime = _runtime(runtime_key)
    layer = runtime.layer_names[int(layer_key)]
    text = None if text_q is None else (text_q, text_k, text_v)
    video_out, text_out = runtime.plan_and_attend(layer, (q, k, v), text, key_padding_mask, text_position)
    # an op returns tensors, never the output of one of its inputs, and never None
    return video_out, (q.new_empty(0) if text_out is None else text_out)


@attention.register_fake
def _(ticket, layer_key, q, k, v, text_q, text_k, text_v, key_padding_mask, runtime_key, text_position):
    return torch.empty_like(q), (q.new_empty(0) if text_q is None else torch.empty_like(text_q))


def compiling() -> bool:
    """True while dynamo traces: the hook and the processors then go through the ops above."""
    return torch.compiler.is_compiling()


def as_tensor(timestep: Any) -> torch.Tensor | None:
    """The op takes a tensor timestep; a Python number (a custom loop's) becomes one."""
    if timestep is None or isinstance(timestep, torch.Tensor):
        return timestep
    return torch.tensor(float(timestep))
