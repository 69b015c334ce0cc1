"""The torch_npu test double is strict: each documented rule rejects a violating call.

The double (tests/fakes/torch_npu.py) is the only check of the npu driver on hosts without an Ascend NPU.
Each test here makes one call that the documentation calls invalid and expects the double to refuse it, next
to the nearest valid call, which must pass: a driver change that breaks the op's contract then fails on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from lvsa import registry


def _qkv(B=2, Sq=8, Skv=12, N=2, KN=2, D=64, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Sq, N, D, generator=gen).to(dtype)
    k = torch.randn(B, Skv, KN, D, generator=gen).to(dtype)
    v = torch.randn(B, Skv, KN, D, generator=gen).to(dtype)
    return q, k, v


def _call(op, q, k, v, **kwargs):
    args = dict(num_heads=q.shape[2], num_key_value_heads=k.shape[2], input_layout="BSND",
                scale=1 / math.sqrt(q.shape[-1]), softmax_lse_flag=True)
    args.update(kwargs)
    return op.npu_fused_infer_attention_score(q, k, v, **args)


def _mask(B, Sq, Skv, padded_sample=None):
    """Excluded-keys mask (True = not computed) of shape (B, 1, Sq, Skv): the last key of each sample."""
    m = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool)
    m[..., -1] = True
    if padded_sample is not None:
        m[padded_sample] = True
    return m


def test_valid_call_matches_attention(npu_emulation):
    q, k, v = _qkv(N=4, KN=2)
    out, lse = _call(npu_emulation, q, k, v, atten_mask=_mask(2, 8, 12), inner_precise=2)
    kf, vf = k.float().repeat_interleave(2, 2), v.float().repeat_interleave(2, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) / 8
    scores[..., -1] = float("-inf")
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vf)
    assert (out.float() - expected).abs().max() < 2e-2
    assert lse.shape == (2, 4, 8, 1) and lse.dtype == torch.float32
    assert torch.allclose(lse[..., 0], torch.logsumexp(scores, -1), atol=1e-4)


def test_lse_flag_off_returns_a_zero_tensor(npu_emulation):
    _, lse = _call(npu_emulation, *_qkv(), softmax_lse_flag=False)
    assert lse.shape == (1,) and lse.item() == 0


# -- inner_precise -----------------------------------------------------------------------------------------

def test_inner_precise_only_0_or_1_for_a_single_query(npu_emulation):
    q, k, v = _qkv(Sq=1)
    keep_out = torch.zeros(2, 12, dtype=torch.bool)
    for ok in (0, 1):
        _call(npu_emulation, q, k, v, atten_mask=keep_out, inner_precise=ok)
    for bad in (2, 3):
        with pytest.raises(RuntimeError, match="Q_S == 1 branch supports only 0 and 1"):
            _call(npu_emulation, q, k, v, atten_mask=keep_out, inner_precise=bad)


def test_inner_precise_range_for_prompts(npu_emulation):
    q, k, v = _qkv()
    for ok in (0, 1, 2, 3):
        _call(npu_emulation, q, k, v, inner_precise=ok)
    for bad in (-1, 4):
        with pytest.raises(RuntimeError, match="inner_precise"):
            _call(npu_emulation, q, k, v, inner_precise=bad)


# -- fully masked rows ---------------------------------------------------------------------------------------

def test_row_correction_returns_plus_inf_lse_and_zero_rows(npu_emulation):
    q, k, v = _qkv()
    out, lse = _call(npu_emulation, q, k, v, atten_mask=_mask(2, 8, 12, padded_sample=1), inner_precise=2)
    assert torch.isposinf(lse[1]).all(), "documented: +inf marks a fully masked row under the row correction"
    assert (out[1] == 0).all()
    assert torch.isfinite(lse[0]).all() and torch.isfinite(out[0].float()).all()


def test_fully_masked_rows_without_correction_are_undefined(npu_emulation):
    q, k, v = _qkv()
    out, lse = _call(npu_emulation, q, k, v, atten_mask=_mask(2, 8, 12, padded_sample=1), inner_precise=0)
    assert torch.isnan(out[1].float()).all() and torch.isnan(lse[1]).all()
    q1 = q[:, :1].contiguous()
    out, lse = _call(npu_emulation, q1, k, v, atten_mask=torch.ones(2, 12, dtype=torch.bool))
    assert torch.isnan(out.float()).all(), "the single-query branch has no row correction"


# -- atten_mask ----------------------------------------------------------------------------------------------

def test_mask_shapes_for_prompts(npu_emulation):
    q, k, v = _qkv()
    for shape in ((8, 12), (1, 8, 12), (2, 1, 8, 12), (1, 1, 8, 12)):
        _call(npu_emulation, q, k, v, atten_mask=torch.zeros(shape, dtype=torch.bool))
    for shape in ((2, 12), (2, 8, 12), (2, 2, 8, 12), (8, 11)):
        with pytest.raises(RuntimeError, match="atten_mask shape"):
            _call(npu_emulation, q, k, v, atten_mask=torch.zeros(shape, dtype=torch.bool))


def test_mask_shapes_for_a_single_query(npu_emulation):
    q, k, v = _qkv(Sq=1)
    for shape in ((2, 12), (2, 1, 12), (2, 1, 1, 12)):
        _call(npu_emulation, q, k, v, atten_mask=torch.zeros(shape, dtype=torch.bool))
    for shape in ((12,), (3, 12), (2, 2, 1, 12)):
        with pytest.raises(RuntimeError, match="atten_mask shape"):
            _call(npu_emulation, q, k, v, atten_mask=torch.zeros(shape, dtype=torch.bool))


def test_mask_dtype_values_and_layout(npu_emulation):
    q, k, v = _qkv()
    for dtype in (torch.bool, torch.int8, torch.uint8):
        _call(npu_emulation, q, k, v, atten_mask=torch.zeros(8, 12, dtype=dtype))
    with pytest.raises(RuntimeError, match="atten_mask dtype"):
        _call(npu_emulation, q, k, v, atten_mask=torch.zeros(8, 12))
    with pytest.raises(RuntimeError, match="0 or 1"):
        _call(npu_emulation, q, k, v, atten_mask=torch.full((8, 12), 2, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="contiguous"):
        _call(npu_emulation, q, k, v, atten_mask=torch.zeros(12, 8, dtype=torch.bool).t())


def test_mask_polarity_one_is_not_computed(npu_emulation):
    q, k, v = _qkv()
    out_mask, _ = _call(npu_emulation, q, k, v, atten_mask=_mask(2, 8, 12))
    out_cut, _ = _call(npu_emulation, q, k[:, :-1].contiguous(), v[:, :-1].contiguous())
    assert torch.allclose(out_mask.float(), out_cut.float(), atol=1e-2)


# -- sparse_mode -----------------------------------------------------------------------------------------------

def test_sparse_mode_values_and_masks(npu_emulation):
    q, k, v = _qkv()
    _call(npu_emulation, q, k, v, sparse_mode=1, atten_mask=torch.zeros(8, 12, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="needs an atten_mask"):
        _call(npu_emulation, q, k, v, sparse_mode=1)
    for bad in (5, 8, 9, -1):
        with pytest.raises(RuntimeError, match="sparse_mode"):
            _call(npu_emulation, q, k, v, sparse_mode=bad, atten_mask=torch.zeros(8, 12, dtype=torch.bool))


# -- tensors -------------------------------------------------------------------------------------------------

def test_key_and_value_follow_the_query(npu_emulation):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="differs from the query"):
        _call(npu_emulation, q, k.half(), v.half())
    with pytest.raises(RuntimeError, match="same shape"):
        _call(npu_emulation, q, k, v[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="dtype"):
        _call(npu_emulation, q.float(), k.float(), v.float())
    with pytest.raises(RuntimeError, match="contiguous"):
        _call(npu_emulation, q.transpose(1, 2).contiguous().transpose(1, 2), k, v)


def test_head_counts(npu_emulation):
    q, k, v = _qkv(N=4, KN=2)
    with pytest.raises(RuntimeError, match="num_heads"):
        _call(npu_emulation, q, k, v, num_heads=2)
    with pytest.raises(RuntimeError, match="num_key_value_heads"):
        _call(npu_emulation, q, k, v, num_key_value_heads=1)
    q, k, v = _qkv(N=65, KN=1, D=16)
    with pytest.raises(RuntimeError, match="num_key_value_heads"):
        _call(npu_emulation, q, k, v)  # at most 64 query heads per key/value head


def test_size_limits(npu_emulation):
    with pytest.raises(RuntimeError, match="exceed 256"):
        _call(npu_emulation, *_qkv(N=257, KN=257, D=16, Sq=2, Skv=2, B=1))
    with pytest.raises(RuntimeError, match="at most 512"):
        _call(npu_emulation, *_qkv(D=528, B=1))
    _call(npu_emulation, *_qkv(D=8, B=1))  # 16 bytes: aligned
    with pytest.raises(RuntimeError, match="16-byte"):
        _call(npu_emulation, *_qkv(D=4, B=1))
    _call(npu_emulation, *_qkv(D=24, B=128, Sq=2, Skv=2, N=1, KN=1))
    with pytest.raises(RuntimeError, match="32-byte aligned"):
        _call(npu_emulation, *_qkv(D=24, B=129, Sq=2, Skv=2, N=1, KN=1))
    with pytest.raises(RuntimeError, match="65536"):
        _call(npu_emulation, *_qkv(B=65537, Sq=2, Skv=1, N=1, KN=1, D=16))
    with pytest.raises(RuntimeError, match="262144"):
        _call(npu_emulation, *_qkv(B=1, Sq=1, Skv=262145, N=1, KN=1, D=16))


def test_unknown_keywords_are_errors(npu_emulation):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="softmax_scale"):
        _call(npu_emulation, q, k, v, softmax_scale=0.1)  # the v2 op's name, not this op's
    with pytest.raises(NotImplementedError, match="pse_shift"):
        _call(npu_emulation, q, k, v, pse_shift=torch.zeros(1, 2, 8, 12, dtype=torch.bfloat16))


# -- torch.npu ---------------------------------------------------------------------------------------------------

def test_set_device(npu_emulation):
    torch.npu.set_device(0)
    torch.npu.set_device("npu:0")
    assert torch.npu.current_device() == 0
    with pytest.raises(RuntimeError, match="Invalid device id"):
        torch.npu.set_device(1)
    with pytest.raises(TypeError):
        torch.npu.set_device(0.0)
    registry.get_device("npu").set_device(0)  # what the device module calls before a collective
    with pytest.raises(RuntimeError, match="Invalid device id"):
        registry.get_device("npu").set_device(3)


def test_layouts_and_kv_lengths(npu_emulation):
    q, k, v = _qkv()
    out, _ = _call(npu_emulation, q, k, v, actual_seq_lengths_kv=[11])
    cut, _ = _call(npu_emulation, q, k[:, :11].contiguous(), v[:, :11].contiguous())
    assert torch.allclose(out.float(), cut.float(), atol=1e-2)
    with pytest.raises(RuntimeError, match="actual_seq_lengths_kv"):
        _call(npu_emulation, q, k, v, actual_seq_lengths_kv=[13])
    with pytest.raises(RuntimeError, match="actual_seq_lengths_kv"):
        _call(npu_emulation, *_qkv(B=3), actual_seq_lengths_kv=[4, 4])
    with pytest.raises(NotImplementedError, match="TND"):
        _call(npu_emulation, q, k, v, input_layout="TND")
    with pytest.raises(RuntimeError, match="4-d"):
        _call(npu_emulation, q[0], k[0], v[0])
