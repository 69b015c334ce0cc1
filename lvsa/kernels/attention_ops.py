"""The attention operations several drivers share, each written once: dense attention (torch SDPA, cuDNN
first on CUDA), attention over a subset of keys that also returns its log-sum-exp, the merge of such
partial results over disjoint key sets, the padding mask over the whole sequence, and the text's key
positions. Drivers that split a plan into a dense part (every query against the globals and text) and a
banded part (each frame against its window) are built from these.

Tensors use diffusers' layout ``[batch, seq, heads, head_dim]``; log-sum-exp is float32, natural log,
``[batch, heads, seq]``. Only fused kernels that return log-sum-exp are used: where none exists for a
device, :func:`lse_kernel_reason` says why and the caller takes another path."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lvsa.plan import SparsePlan

_cuda_choice: dict[bool, str] = {}
_cuda_lock = threading.Lock()


def lse_kernel_reason(device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """``None`` when :func:`attention_with_lse` has a fused kernel for this call, else why not.

    These are torch's private kernels, which skip the checks of the public SDPA front-end: a dtype or size
    they do not support can give garbage instead of an error, so the limits are checked here."""
    if device_type == "cpu":
        return None if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") else (
            f"torch {torch.__version__} has no CPU flash attention with log-sum-exp")
    if device_type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            return f"CUDA attention kernels with log-sum-exp take float16/bfloat16, not {str(dtype)[6:]}"
        if head_dim > 128 or head_dim % 8:
            return f"CUDA attention kernels with log-sum-exp take head_dim <= 128 in steps of 8, not {head_dim}"
        return None
    return f"no fused attention with log-sum-exp for {device_type} in torch"


def key_bias(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive ``[batch, 1, 1, keys]`` bias from a ``[batch, keys]`` keep-mask (0 kept, -inf dropped).

    Its rows are stored 16 elements apart whatever the number of keys: the memory-efficient CUDA kernel
    reads the bias with aligned vector loads (torch's public SDPA pads the same way)."""
    if key_mask is None:
        return None
    batch, keys = key_mask.shape
    storage = torch.zeros(batch, -(-keys // 16) * 16, dtype=dtype, device=key_mask.device)
    bias = storage[:, :keys]
    bias.masked_fill_(~key_mask, float("-inf"))
    return bias[:, None, None, :]


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> ``[B, S, heads, D]`` for kernels without GQA (a copy only when Hkv < heads)."""
    groups = heads // x.shape[2]
    if groups == 1:
        return x
    B, S, H, D = x.shape
    return x[:, :, :, None, :].expand(B, S, H, groups, D).reshape(B, S, heads, D)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``[B, S, H, D]`` tensors (equal head counts) and its log-sum-exp ``[B, H, S]``.

    ``bias`` is an additive ``[B, 1, 1, keys]`` mask in q's dtype (see :func:`key_bias`)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, attn_mask=bias, scale=scale
        )
    elif q.device.type == "cuda":
        out, lse = _cuda_attention_with_lse(qt, kt, vt, bias, scale)
    else:
        raise RuntimeError(lse_kernel_reason(q.device.type, q.dtype, q.shape[-1]))
    return out.transpose(1, 2), lse.reshape(lse.shape[0], lse.shape[1], -1).float()


def _cuda_attention_with_lse(qt, kt, vt, bias, scale):
    """Unmasked: cuDNN first (the fastest dense kernel on Hopper), then flash, then memory-efficient.
    Masked: the memory-efficient kernel, the one whose additive-bias input torch itself relies on."""
    masked = bias is not None
    order = ["efficient"] if masked else ["cudnn", "flash", "efficient"]
    choice = _cuda_choice.get(masked)
    if choice:
        order.remove(choice)
        order.insert(0, choice)
    errors = []
    for name in order:
        try:
            result = _CUDA_KERNELS[name](qt, kt, vt, bias, scale)
        except RuntimeError as error:  # a kernel that cannot take this shape/layout: try the next one
            errors.append(f"{name}: {error}")
            continue
        if name != choice:
            with _cuda_lock:
                _cuda_choice[masked] = name
        return result
    raise RuntimeError("no CUDA attention kernel with log-sum-exp accepted this call:\n  " + "\n  ".join(errors))


def _cudnn(qt, kt, vt, bias, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _efficient(qt, kt, vt, bias, scale):
    if bias is not None:
        bias = bias.expand(qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, bias, True, 0.0, False, scale=scale)
    return out[0], out[1][..., : qt.shape[2]]


def _flash(qt, kt, vt, bias, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)
    return out[0], out[1]


_CUDA_KERNELS = {"cudnn": _cudnn, "efficient": _efficient, "flash": _flash}


def without_empty_samples(
    out: torch.Tensor, lse: torch.Tensor, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial over a masked key set, with the samples that kept no key made empty: ``lse = -inf`` and a
    zero output, so that :func:`merge` gives them no weight.

    Kernels disagree on such rows (torch's CPU and CUDA kernels: -inf or NaN with NaN outputs; Ascend's
    fused-infer op: +inf under its row correction, undefined without it), and a padded text part of a CFG
    batch (an empty negative prompt) is exactly this case. ``key_mask`` is ``[B, keys]``, True = keep; the
    check stays on the device (no host synchronisation)."""
    if key_mask is None:
        return out, lse
    empty = ~key_mask.bool().any(dim=1)  # [B]
    # in place on the kernel's fresh outputs: no second copy of the partial on the per-layer path
    return out.masked_fill_(empty[:, None, None, None], 0), lse.masked_fill_(empty[:, None, None], float("-inf"))


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype partial attentions are merged in: float32, or float64 for float64 inputs (the reference's)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor) -> None:
    """Write into ``out`` the attention over the union of disjoint key sets, from each set's output
    ``[B, S, H, D]`` and log-sum-exp ``[B, H, S]``: a softmax over the log-sum-exps weights the outputs
    (computed in :func:`accumulation_dtype`)."""
    dtype = accumulation_dtype(parts[0][0])
    if len(parts) == 2:  # the common case, with fewer temporaries: o2 + (o1 - o2) * sigmoid(lse1 - lse2)
        (o1, lse1), (o2, lse2) = parts
        weight = torch.sigmoid((lse1 - lse2).to(dtype)).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
        out.copy_(torch.lerp(o2.to(dtype), o1.to(dtype), weight))
        return
    weights = torch.softmax(torch.stack([lse.to(dtype) for _, lse in parts]), dim=0)  # [parts, B, H, S]
    total = None
    for (o, _), w in zip(parts, weights, strict=True):
        term = o.to(dtype) * w.transpose(1, 2).unsqueeze(-1)
        total = term if total is None else total.add_(term)
    out.copy_(total)


def sequence_key_mask(plan: SparsePlan, key_padding_mask: torch.Tensor | None, batch: int,
                      device: torch.device) -> torch.Tensor | None:
    """The ``[B, text_tokens]`` padding mask (True = keep) as a ``[B, S]`` mask over the whole sequence
    (every video key kept), or None without padding."""
    return key_mask_with_text(key_padding_mask, plan.seq_len, plan.text_start, batch, device)


def key_mask_with_text(key_padding_mask: torch.Tensor | None, seq_len: int, text_start: int, batch: int,
                       device: torch.device) -> torch.Tensor | None:
    """:func:`sequence_key_mask` for a sequence known by its length and where its text starts."""
    if key_padding_mask is None:
        return None
    key_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    key_mask[:, text_start : text_start + key_padding_mask.shape[1]] = key_padding_mask.bool()
    return key_mask


def text_keys(plan: SparsePlan, device: torch.device | str) -> torch.Tensor | None:
    """Positions of the text tokens in the sequence (attended by every query), or None without text."""
    if not plan.text_tokens:
        return None
    return torch.arange(plan.text_start, plan.text_start + plan.text_tokens, device=device)


def attend_with_lse(q, k, v, key_mask, scale):
    """The split's kernel on torch: fused attention returning log-sum-exp (GQA expanded first)."""
    heads = q.shape[2]
    bias = None if key_mask is None else key_bias(key_mask, q.dtype)
    out, lse = attention_with_lse(q, expand_heads(k, heads), expand_heads(v, heads), bias,
                                          scale)
    return without_empty_samples(out, lse, key_mask)


def dense_attention(q, k, v, key_mask=None, scale=None):
    """Plain SDPA over the whole sequence; ``key_mask`` ``[B, S]`` (True = keep) masks keys."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return sdpa(q, k, v, mask, scale, q.shape[2] != k.shape[2])


def sdpa(q, k, v, mask, scale, gqa):
    """SDPA on ``[B, S, H, D]`` tensors (torch wants heads before sequence), cuDNN first on CUDA."""
    with _prefer_cudnn(q.device.type):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    return out.transpose(1, 2)


def _prefer_cudnn(device_type: str):
    """On CUDA, try cuDNN attention before flash (faster on Hopper); other devices keep torch's order."""
    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: keep its own order
        return contextlib.nullcontext()
