"""A test double of torch_npu for hosts without an Ascend NPU.

It implements, in plain torch on the CPU, the documented semantics of what lvsa calls:

- ``npu_fused_infer_attention_score`` (torch_npu 2.13 docs): layouts BSH / BSND / BNSD; ``num_heads`` must
  equal the query's heads; ``num_key_value_heads`` (0 = same) for GQA, ratio at most 64; ``scale``
  defaults to **1.0**; ``atten_mask`` bool/int8/uint8 where **1/True = not computed**, shapes
  (Q_S, KV_S), (1, Q_S, KV_S), (B, 1, Q_S, KV_S), (1, 1, Q_S, KV_S), contiguous; with ``sparse_mode`` 0
  and a mask, ``pre_tokens``/``next_tokens`` bound the computed band; ``actual_seq_lengths_kv`` cuts each
  batch's keys; float16/bfloat16 only; inputs must be contiguous; D a multiple of 16 up to 512;
  ``softmax_lse_flag`` returns float32 ``(B, N, Q_S, 1)`` natural-log LSE (else a ``[1]`` zero tensor);
  fully masked rows are garbage (NaN here) unless ``inner_precise`` has bit 1 set, which zeroes them.
- ``torch.npu``: availability, device count and name, synchronize, allocator statistics.

Every call is recorded in ``calls`` so tests can check the arguments, such as the mask's polarity."""

from __future__ import annotations

import types

import torch

__version__ = "2.13.0+cpu-emulation"
calls: list[dict] = []


class EmulatedNpu(types.SimpleNamespace):
    """What lvsa's NPU device module asks of ``torch.npu``."""

    def __init__(self) -> None:
        super().__init__(allocated=0, peak=0, reserved=0, synchronized=0)

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def get_device_name(self, index=None) -> str:
        return "Ascend910B3 (emulated)"

    def synchronize(self, index=None) -> None:
        self.synchronized += 1

    def memory_allocated(self, index=None) -> int:
        return self.allocated

    def max_memory_allocated(self, index=None) -> int:
        return self.peak

    def memory_reserved(self, index=None) -> int:
        return self.reserved

    def reset_peak_memory_stats(self, index=None) -> None:
        self.peak = self.allocated


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        B, S, H = x.shape
        return x.view(B, S, heads, H // heads).transpose(1, 2)
    raise NotImplementedError(f"input_layout {layout!r} is not emulated")


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x.contiguous()
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    B, N, S, D = x.shape
    return x.transpose(1, 2).reshape(B, S, N * D)


def npu_fused_infer_attention_score(
    query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
    num_heads=1, scale=1.0, pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0, antiquant_mode=0,
    softmax_lse_flag=False, **others,
):
    calls.append(dict(query=query, key=key, value=value, atten_mask=atten_mask, num_heads=num_heads, scale=scale,
                      input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode,
                      inner_precise=inner_precise, softmax_lse_flag=softmax_lse_flag,
                      actual_seq_lengths_kv=actual_seq_lengths_kv))
    used = {k: v for k, v in others.items() if v is not None}
    if used or pse_shift is not None or actual_seq_lengths is not None or block_size or antiquant_mode:
        raise NotImplementedError(f"not emulated: {sorted(used) or 'pse/paging/quantisation'}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{name} dtype {t.dtype} is not supported (float16, bfloat16)")
        if not t.is_contiguous():
            raise RuntimeError(f"{name} must be contiguous")
    if sparse_mode not in (0, 1):
        raise NotImplementedError("only sparse_mode 0 and 1 (explicit masks) are emulated")
    q = _to_bnsd(query, input_layout, num_heads)
    kv_heads = num_key_value_heads or num_heads
    k, v = _to_bnsd(key, input_layout, kv_heads), _to_bnsd(value, input_layout, kv_heads)
    B, N, Sq, D = q.shape
    if N != num_heads:
        raise RuntimeError(f"num_heads={num_heads} but the query has {N} heads")
    if k.shape[1] != kv_heads or N % kv_heads or N // kv_heads > 64:
        raise RuntimeError(f"bad num_key_value_heads={num_key_value_heads} for {N} query heads")
    if D % 16 or D > 512:
        raise RuntimeError(f"head dim {D} must be a multiple of 16 up to 512")
    Skv = k.shape[2]
    groups = N // kv_heads
    scores = torch.einsum("bnqd,bnkd->bnqk", q.float(), k.float().repeat_interleave(groups, 1)) * scale
    excluded = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool)
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.int8, torch.uint8):
            raise RuntimeError(f"atten_mask dtype {atten_mask.dtype} (bool, int8, uint8)")
        if not atten_mask.is_contiguous():
            raise RuntimeError("atten_mask must be contiguous")
        shape = tuple(atten_mask.shape)
        if shape not in ((Sq, Skv), (1, Sq, Skv), (B, 1, Sq, Skv), (1, 1, Sq, Skv)):
            raise RuntimeError(f"atten_mask shape {shape} for B={B} Q_S={Sq} KV_S={Skv}")
        excluded = excluded | atten_mask.bool().reshape(-1, 1, Sq, Skv)  # 1 = not computed
        if sparse_mode == 0:
            i = torch.arange(Sq)[:, None]
            j = torch.arange(Skv)[None, :]
            excluded = excluded | (j - i > next_tokens) | (i - j > pre_tokens)
    if actual_seq_lengths_kv is not None:
        lengths = list(actual_seq_lengths_kv)
        lengths = lengths * B if len(lengths) == 1 else lengths
        for b in range(B):
            excluded[b, :, :, lengths[b]:] = True
    scores = scores.masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.einsum("bnqk,bnkd->bnqd", torch.softmax(scores, -1), v.float().repeat_interleave(groups, 1))
    invalid = torch.isinf(lse) & (lse < 0)
    out = out.masked_fill(invalid, 0.0 if inner_precise & 2 else float("nan"))
    result = _from_bnsd(out.to(query.dtype), input_layout)
    return result, (lse.float() if softmax_lse_flag else torch.zeros(1))


def install(torch_module=torch) -> EmulatedNpu:
    """Give ``torch`` an emulated ``torch.npu`` (what importing torch_npu does on an Ascend host)."""
    npu = EmulatedNpu()
    torch_module.npu = npu
    return npu
