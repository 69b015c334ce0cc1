"""A strict test double of torch_npu for hosts without an Ascend NPU.

It implements, in plain torch on the CPU, what lvsa calls, as the documentation states it, and it **rejects**
what the documentation calls invalid, so that a driver change that breaks the op's contract fails on CPU
instead of on a customer's Ascend host. Every rule cites its source; the sources are:

- [OPP] Ascend op-plugin, ``docs/zh/custom_APIs/torch_npu/torch_npu-npu_fused_infer_attention_score.md``
  (the torch_npu API page of ``npu_fused_infer_attention_score``); sections named as in that page:
  "各轴取值范围速查" (axis limits), "详细参数说明" (parameters), "通用基础约束" (base constraints),
  "Q_S > 1（Prefill）专属约束" and "Q_S = 1（Decode）专属约束".
- [YAML] Ascend op-plugin, ``op_plugin/config/op_plugin_functions.yaml``, the binding schema of
  ``npu_fused_infer_attention_score``: three positional tensors, everything else keyword-only.
- [V4] ops-transformer, ``aclnnFusedInferAttentionScoreV4.md``, output ``softmaxLse``: with the row
  correction (``inner_precise`` bit 1), a fully masked row's log-sum-exp is **+inf** ("inf marks invalid
  data") and its output row is zero.
- [PFA] the prompt-flash-attention pages (``torch_npu-npu_prompt_flash_attention.md``), ``atten_mask``:
  1/True marks a position that is **not computed**.

What the documentation leaves undefined is made visibly wrong here (NaN), never silently right: a fully
masked row without the row correction ([OPP] inner_precise note: "precision may be lost"), and any fully
masked row of the single-query (Q_S == 1) branch, which has no row correction at all.

Also ``torch.npu``: availability, device count and name, ``set_device``, synchronize, allocator statistics.
Every op call is recorded in ``calls`` so tests can check the arguments, such as the mask's polarity."""

from __future__ import annotations

import types

import torch

__version__ = "2.13.0+cpu-emulation"
calls: list[dict] = []

INT_MAX = 2147483647

#: [YAML] the keyword-only arguments of the schema, with their defaults. Anything else is a TypeError, as
#: the real binding raises for an unexpected keyword.
FIA_KEYWORDS = {
    "pse_shift": None, "atten_mask": None, "actual_seq_lengths": None, "actual_seq_lengths_kv": None,
    "dequant_scale1": None, "quant_scale1": None, "dequant_scale2": None, "quant_scale2": None,
    "quant_offset2": None, "antiquant_scale": None, "antiquant_offset": None, "block_table": None,
    "query_padding_size": None, "kv_padding_size": None, "key_antiquant_scale": None,
    "key_antiquant_offset": None, "value_antiquant_scale": None, "value_antiquant_offset": None,
    "key_shared_prefix": None, "value_shared_prefix": None, "actual_shared_prefix_len": None,
    "query_rope": None, "key_rope": None, "key_rope_antiquant_scale": None,
    "num_heads": 1, "scale": 1.0, "pre_tokens": INT_MAX, "next_tokens": INT_MAX, "input_layout": "BSH",
    "num_key_value_heads": 0, "sparse_mode": 0, "inner_precise": 0, "block_size": 0, "antiquant_mode": 0,
    "softmax_lse_flag": False, "key_antiquant_mode": 0, "value_antiquant_mode": 0,
}
#: documented features this double does not emulate (quantisation, paging, prefix, MLA, left padding, pse):
#: a call that uses one fails loudly instead of being computed as if the argument were absent
NOT_EMULATED = {name for name, default in FIA_KEYWORDS.items() if default is None} - {
    "atten_mask", "actual_seq_lengths_kv"}
LAYOUTS = ("BSH", "BSND", "BNSD")


class OpError(RuntimeError):
    """What the real op raises (an aclnn error surfaced as RuntimeError) for a call the docs call invalid."""


class EmulatedNpu(types.SimpleNamespace):
    """What lvsa's NPU device module asks of ``torch.npu``."""

    def __init__(self, count: int = 1) -> None:
        super().__init__(allocated=0, peak=0, reserved=0, synchronized=0, count=count, current=0)

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def _index(self, device) -> int:
        if isinstance(device, torch.device):
            if device.type != "npu":
                raise ValueError(f"Expected a npu device, but got: {device}")
            device = 0 if device.index is None else device.index
        elif isinstance(device, str):  # "npu" or "npu:N" (torch.device() knows "npu" only once torch_npu is in)
            kind, _, index = device.partition(":")
            if kind != "npu" or (index and not index.isdigit()):
                raise ValueError(f"Expected a npu device, but got: {device}")
            return self._index(int(index) if index else 0)
        if not isinstance(device, int) or isinstance(device, bool):
            raise TypeError(f"device must be an int, a str or a torch.device, not {type(device).__name__}")
        if not 0 <= device < self.count:
            raise RuntimeError(f"Invalid device id {device} (device count {self.count})")
        return device

    def set_device(self, device) -> None:
        self.current = self._index(device)

    def current_device(self) -> int:
        return self.current

    def get_device_name(self, index=None) -> str:
        self._index(self.current if index is None else index)
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

    def mem_get_info(self, index=None) -> tuple[int, int]:
        """(free, total) of the device, as torch.cuda.mem_get_info answers: an emulated 64 GiB card."""
        total = 64 << 30
        return total - self.reserved, total


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    B, S, H = x.shape
    return x.view(B, S, heads, H // heads).transpose(1, 2)


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return x.contiguous()
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    B, N, S, D = x.shape
    return x.transpose(1, 2).reshape(B, S, N * D)


def _shape(x: torch.Tensor, layout: str, heads: int) -> tuple[int, int, int, int]:
    """(B, N, S, D) of a tensor in ``layout``; raises for a rank that does not fit it."""
    expected = 3 if layout == "BSH" else 4
    if x.dim() != expected:
        raise OpError(f"input_layout {layout} takes {expected}-d tensors, got shape {tuple(x.shape)}")
    if layout == "BNSD":
        return tuple(x.shape)
    if layout == "BSND":
        B, S, N, D = x.shape
        return B, N, S, D
    B, S, H = x.shape
    if heads <= 0 or H % heads:
        raise OpError(f"BSH hidden size {H} is not a multiple of {heads} heads")
    return B, heads, S, H // heads


def _allowed_mask_shapes(B: int, Sq: int, Skv: int, sparse_mode: int) -> tuple[tuple[int, ...], ...]:
    # [OPP] 详细参数说明 > atten_mask (Atlas A2/A3): sparse_mode 0/1 take (1, Q_S, KV_S), (B, 1, Q_S, KV_S) and
    # (1, 1, Q_S, KV_S); with layouts BSH/BSND/BNSD and no rope, Q_S == 1 also takes (B, KV_S) and Q_S > 1
    # also (Q_S, KV_S). sparse_mode 2/3/4: the compressed (2048, 2048) mask (optionally with leading 1s).
    # [OPP] Q_S = 1 branch, recommended shapes: (B, KV_S), (B, 1, KV_S), (B, 1, 1, KV_S).
    # The docs also allow S padded up to 16/32 alignment; lvsa never pads, so exact shapes are required.
    if sparse_mode in (2, 3, 4):
        return ((2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048))
    if Sq == 1:
        return ((B, Skv), (B, 1, Skv), (B, 1, 1, Skv), (1, 1, Skv), (1, 1, 1, Skv))
    return ((Sq, Skv), (1, Sq, Skv), (B, 1, Sq, Skv), (1, 1, Sq, Skv))


def _check(query, key, value, a: dict) -> tuple[int, int, int, int, int, int]:
    """Every documented rule the call must meet; returns (B, N, Q_S, D, KV_N, KV_S)."""
    layout = a["input_layout"]
    # [OPP] 详细参数说明 > input_layout: BSH, BSND, BNSD (others exist: TND and the *_NBSD/BNSD_BSND output
    # conversions, which lvsa does not use and this double does not emulate)
    if layout not in LAYOUTS:
        raise NotImplementedError(f"input_layout {layout!r} is not emulated (only {', '.join(LAYOUTS)})")
    # [OPP] 详细参数说明 > query/key/value: float16 or bfloat16 on Atlas A2/A3 (key/value int8/int4 only with
    # the antiquant arguments, not emulated); "不支持非连续Tensor": non-contiguous tensors are not supported
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise OpError(f"{name} dtype {t.dtype} is not supported (float16, bfloat16)")
        if not t.is_contiguous():
            raise OpError(f"{name} must be contiguous")
    # [OPP] 通用基础约束: key and value must have exactly the same shape; without quantisation they carry the
    # query's dtype (the int8/int4 key/value cases all need antiquant scales)
    if key.shape != value.shape:
        raise OpError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise OpError(f"key/value dtype {key.dtype}/{value.dtype} differs from the query's {query.dtype}")
    num_heads, kv_arg = a["num_heads"], a["num_key_value_heads"]
    kv_heads = kv_arg or num_heads
    B, N, Sq, D = _shape(query, layout, num_heads)
    Bk, KN, Skv, Dk = _shape(key, layout, kv_heads)
    # [OPP] num_heads: must equal the query's N axis (BNSD; BSND reads N from the shape the same way)
    if N != num_heads:
        raise OpError(f"num_heads={num_heads} but the query has {N} heads")
    # [OPP] num_key_value_heads: 0 = num_heads; num_heads divisible by it, ratio <= 64; for BSND/BNSD it must
    # equal the key/value N axis
    if KN != kv_heads or num_heads % kv_heads or num_heads // kv_heads > 64:
        raise OpError(f"num_key_value_heads={kv_arg} does not fit {num_heads} query heads and {KN} key heads")
    if Bk != B or Dk != D:
        raise OpError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} in batch or head dim")
    # [OPP] 各轴取值范围速查: B <= 65536, Q_N and KV_N <= 256, D <= 512 and, for float16/bfloat16, 16-byte
    # aligned; Q_S > 1: Q_S and KV_S <= 20971520; Q_S == 1: KV_S <= 262144
    if B > 65536:
        raise OpError(f"B={B} exceeds 65536")
    if N > 256 or KN > 256:
        raise OpError(f"head counts {N}/{KN} exceed 256")
    item = query.element_size()
    if D > 512 or (D * item) % 16:
        raise OpError(f"head dim {D} must be at most 512 and {16 // item}-element (16-byte) aligned")
    if Sq == 1 and Skv > 262144:
        raise OpError(f"Q_S == 1: KV_S={Skv} exceeds 262144")
    if Sq > 1 and max(Sq, Skv) > 20971520:
        raise OpError(f"Q_S/KV_S {Sq}/{Skv} exceed 20971520")
    # [OPP] Q_S > 1 专属约束, B轴 (Atlas A2/A3): when D is not 32-byte aligned, B <= 128
    if Sq > 1 and (D * item) % 32 and B > 128:
        raise OpError(f"D={D} is not 32-byte aligned: B={B} must be at most 128")
    # [OPP] 详细参数说明 > inner_precise: modes 0..3; "Q_S为1时仅支持0和1"
    precise = a["inner_precise"]
    if precise not in (0, 1, 2, 3):
        raise OpError(f"inner_precise={precise} is not one of 0, 1, 2, 3")
    if Sq == 1 and precise not in (0, 1):
        raise OpError(f"inner_precise={precise}: the Q_S == 1 branch supports only 0 and 1")
    # [OPP] 详细参数说明 > sparse_mode: 0..4; 5-8 "暂不支持" (not supported); Q_S > 1 约束: other values are an
    # error. sparse_mode 1 must be given the full mask; 2/3/4 the compressed 2048 x 2048 mask. (Q_S == 1
    # without rope ignores sparse_mode.)
    sparse_mode, mask = a["sparse_mode"], a["atten_mask"]
    if Sq > 1:
        if sparse_mode not in (0, 1, 2, 3, 4):
            raise OpError(f"sparse_mode={sparse_mode} is not supported (0-4)")
        if sparse_mode != 0 and mask is None:
            raise OpError(f"sparse_mode={sparse_mode} needs an atten_mask")
        if sparse_mode in (2, 3, 4):
            raise NotImplementedError("sparse_mode 2/3/4 (compressed causal/band masks) are not emulated")
    if mask is not None:
        # [OPP] 详细参数说明 > atten_mask: bool, int8 or uint8, contiguous; [PFA] values 0 (computed) / 1 (not)
        if mask.dtype not in (torch.bool, torch.int8, torch.uint8):
            raise OpError(f"atten_mask dtype {mask.dtype} (bool, int8, uint8)")
        if not mask.is_contiguous():
            raise OpError("atten_mask must be contiguous")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise OpError("atten_mask values must be 0 or 1")
        shape = tuple(mask.shape)
        allowed = _allowed_mask_shapes(B, Sq, Skv, sparse_mode)
        if shape not in allowed:
            raise OpError(f"atten_mask shape {shape} for B={B} Q_S={Sq} KV_S={Skv}: allowed {allowed}")
    lengths = a["actual_seq_lengths_kv"]
    if lengths is not None:
        # [OPP] actual_seq_lengths(_kv): length 1 (shared) or >= B values, each at most the KV S
        lengths = list(lengths)
        if len(lengths) != 1 and len(lengths) < B:
            raise OpError(f"actual_seq_lengths_kv has {len(lengths)} values for B={B}")
        if any(not 0 <= n <= Skv for n in lengths):
            raise OpError(f"actual_seq_lengths_kv {lengths} outside 0..{Skv}")
    return B, N, Sq, D, KN, Skv


def npu_fused_infer_attention_score(query, key, value, **kwargs):
    """The op: ``softmax(scale * q k^T + mask) v``, and the natural-log LSE ``(B, N, Q_S, 1)`` when asked."""
    unknown = sorted(set(kwargs) - set(FIA_KEYWORDS))
    if unknown:  # [YAML] the schema's keyword-only arguments are the only ones
        raise TypeError(f"npu_fused_infer_attention_score() got unexpected keyword arguments {unknown}")
    a = {**FIA_KEYWORDS, **kwargs}
    calls.append(dict(query=query, key=key, value=value, **a))
    used = sorted(name for name in NOT_EMULATED if a[name] is not None)
    if used or a["block_size"] or a["antiquant_mode"] or a["key_antiquant_mode"] or a["value_antiquant_mode"]:
        raise NotImplementedError(f"not emulated: {used or 'paging/quantisation modes'}")
    B, N, Sq, _, KN, Skv = _check(query, key, value, a)
    layout, scale = a["input_layout"], a["scale"]
    q = _to_bnsd(query, layout, N)
    k, v = _to_bnsd(key, layout, KN), _to_bnsd(value, layout, KN)
    groups = N // KN
    scores = torch.einsum("bnqd,bnkd->bnqk", q.float(), k.float().repeat_interleave(groups, 1)) * scale
    excluded = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool)
    mask = a["atten_mask"]
    if mask is not None:
        if Sq == 1:  # every Q_S == 1 shape holds one KV row per batch entry (or one shared row)
            excluded = excluded | mask.bool().reshape(-1, 1, 1, Skv)
        else:
            excluded = excluded | mask.bool().reshape(-1, 1, Sq, Skv)  # [PFA] 1 = not computed
            if a["sparse_mode"] == 0:
                # [OPP] sparse_mode 0 with a mask: only the band between pre_tokens and next_tokens is computed
                i = torch.arange(Sq)[:, None]
                j = torch.arange(Skv)[None, :]
                excluded = excluded | (j - i > a["next_tokens"]) | (i - j > a["pre_tokens"])
    lengths = a["actual_seq_lengths_kv"]
    if lengths is not None:
        lengths = list(lengths) * B if len(lengths) == 1 else list(lengths)
        for b in range(B):
            excluded[b, :, :, lengths[b]:] = True
    scores = scores.masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.einsum("bnqk,bnkd->bnqd", torch.softmax(scores, -1), v.float().repeat_interleave(groups, 1))
    invalid = torch.isinf(lse) & (lse < 0)  # rows with no computed key
    if Sq > 1 and a["inner_precise"] & 2:
        # [V4] softmaxLse: row correction gives +inf ("invalid data") and a zero output row
        out = out.masked_fill(invalid, 0.0)
        lse = lse.masked_fill(invalid, float("inf"))
    else:
        # undefined by the docs (no row correction, or the Q_S == 1 branch): visibly wrong
        out = out.masked_fill(invalid, float("nan"))
        lse = lse.masked_fill(invalid, float("nan"))
    result = _from_bnsd(out.to(query.dtype), layout)
    # [OPP] 返回值说明 > softmax_lse: float32 (B, Q_N, Q_S, 1) when asked, else a zero tensor of shape (1,)
    return result, (lse.float() if a["softmax_lse_flag"] else torch.zeros(1))


def install(torch_module=torch) -> EmulatedNpu:
    """Give ``torch`` an emulated ``torch.npu`` (what importing torch_npu does on an Ascend host)."""
    npu = EmulatedNpu()
    torch_module.npu = npu
    return npu
