"""The npu driver and device module against the torch_npu test double (tests/fakes/torch_npu.py).

The parity matrix runs the driver on every geometry (ids ``cpu-npu-emulated-*``); these tests pin the
op-level conventions whose mistakes would be silent on real hardware."""

from __future__ import annotations

import math

import pytest
import torch

import lvsa
from lvsa import registry
from lvsa.backends.npu import NpuDriver, excluded_keys
from lvsa.backends.reference import reference_attention
from lvsa.plan import PatternKnobs, build_plan


def _case(text=5, position="after", heads=(4, 2), step=3, batch=2, dim=64):
    plan = build_plan(12, 4, PatternKnobs(4, 1.0, 1, 1, None, None), text_tokens=text, text_position=position,
                      step=step)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, plan.seq_len, heads[0], dim, generator=gen).bfloat16()
    k, v = (torch.randn(batch, plan.seq_len, heads[1], dim, generator=gen).bfloat16() for _ in range(2))
    mask = None
    if text:
        mask = torch.ones(batch, text, dtype=torch.bool)
        mask[0, -2:] = False
        mask[-1, -1] = False
    return plan, q, k, v, mask


def test_padding_mask_reaches_the_op_inverted(npu_emulation):
    plan, q, k, v, mask = _case()
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask)
    assert (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 3e-2
    masked_calls = [c for c in npu_emulation.calls if c["atten_mask"] is not None]
    assert masked_calls, "the padded text keys never reached the op as a mask"
    for call in masked_calls:
        atten_mask = call["atten_mask"]
        assert atten_mask.dtype == torch.bool and atten_mask.shape[1] == 1
        # the op's convention: True = excluded; exactly the padded text keys
        assert torch.equal(atten_mask[:, 0, 0, :], ~mask)
        assert call["inner_precise"] == 2


def test_wrong_polarity_would_be_caught(npu_emulation, monkeypatch):
    """Guard the guard: with the keep-mask passed as is, the output no longer matches the reference."""
    import lvsa.backends.npu as npu_module

    plan, q, k, v, mask = _case()
    monkeypatch.setattr(npu_module, "excluded_keys",
                        lambda key_mask, queries: key_mask[:, None, None, :].expand(
                            key_mask.shape[0], 1, queries, key_mask.shape[1]).contiguous())
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask)
    assert not (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 3e-2


def test_scale_layout_and_gqa_are_explicit(npu_emulation):
    plan, q, k, v, _ = _case(text=0)
    lvsa.sparse_attention(q, k, v, plan, backend="npu")
    for call in npu_emulation.calls:
        assert call["scale"] == pytest.approx(1 / math.sqrt(64))  # the op's default would be 1.0
        assert call["input_layout"] == "BSND" and call["num_heads"] == 4 and call["num_key_value_heads"] == 2
        assert call["softmax_lse_flag"] is True


def test_explicit_scale_and_text_before(npu_emulation):
    plan, q, k, v, mask = _case(position="before", heads=(2, 2), batch=1)
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask, scale=0.05)
    assert (out.double() - reference_attention(q, k, v, plan, mask, 0.05)).abs().max() < 3e-2


def test_dense_plan_with_padding_is_exact(npu_emulation):
    plan = build_plan(5, 4, PatternKnobs(21, 1.0, 1, 1, None, None), text_tokens=3)
    q, k, v = (torch.randn(1, plan.seq_len, 2, 32).bfloat16() for _ in range(3))
    mask = torch.tensor([[True, False, True]])
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask)
    assert (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 3e-2


def test_unsupported_head_dim_and_dtype(npu_emulation):
    problem = lvsa.AttentionProblem("npu", 0, torch.float32, 1, 8, 2, 2, 72, 0, False, 72**-0.5)
    reasons = NpuDriver().check(problem)
    assert any("float32" in r for r in reasons) and any("multiples of 16" in r for r in reasons)


def test_device_module_with_torch_npu(npu_emulation):
    device = registry.get_device("npu")
    assert device.collective_backend == "hccl"
    assert device.is_available() and device.count() == 1
    torch.npu.allocated, torch.npu.peak = 100, 250
    stats = device.memory(0)
    assert (stats.kind, stats.current, stats.peak) == ("allocator", 100, 250)
    device.reset_peak(0)
    assert device.memory(0).peak == 100
    device.synchronize(0)
    assert torch.npu.synchronized == 1


def test_without_torch_npu_the_reasons_name_the_install():
    if registry.get_device("npu").is_available():
        pytest.skip("a real NPU is present")
    assert "pip install 'lvsa[npu]'" in registry.get_device("npu").is_available().reason
    assert "pip install 'lvsa[npu]'" in NpuDriver().is_available("npu").reason


def test_excluded_keys_shape_and_polarity():
    keep = torch.tensor([[True, False], [False, True]])
    mask = excluded_keys(keep, 3)
    assert mask.shape == (2, 1, 3, 2) and mask.is_contiguous()
    assert torch.equal(mask[:, 0, 1], ~keep)


def test_single_text_token_uses_the_single_query_branch_contract(npu_emulation):
    """One text token: its query rows form a Q_S == 1 call, which takes a (B, KV_S) mask and inner_precise 0."""
    plan, q, k, v, _ = _case(text=1)
    mask = torch.tensor([[False], [True]])  # sample 0's only text token padded
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask)
    assert (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 3e-2
    single = [c for c in npu_emulation.calls if c["query"].shape[1] == 1 and c["atten_mask"] is not None]
    assert single, "the text query never reached the op as a single-query call"
    for call in single:
        assert call["inner_precise"] in (0, 1) and call["atten_mask"].shape == (2, call["key"].shape[1])


@pytest.mark.parametrize("dense", [False, True], ids=["split", "dense"])
def test_sample_with_every_text_key_padded(npu_emulation, dense):
    """An empty negative prompt in a CFG batch: the op returns +inf log-sum-exp for its text part."""
    plan, q, k, v, _ = _case(text=4)
    if dense:
        plan = build_plan(5, 4, PatternKnobs(21, 1.0, 1, 1, None, None), text_tokens=4)
        q, k, v = (t[:, : plan.seq_len].contiguous() for t in (q, k, v))
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask)
    assert torch.isfinite(out.float()).all()
    assert (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 3e-2
    # the op really was given a sample with no computed key (else this test would prove nothing)
    assert any(c["atten_mask"].reshape(2, -1).all(dim=1).any() for c in npu_emulation.calls
               if c["atten_mask"] is not None)


def test_window_chunks_respect_the_batch_limit(npu_emulation, monkeypatch):
    import lvsa.backends.npu as npu_module

    monkeypatch.setattr(npu_module, "MAX_BATCH", 6)
    plan, q, k, v, mask = _case(batch=2)
    out = lvsa.sparse_attention(q, k, v, plan, backend="npu", key_padding_mask=mask)
    assert (out.double() - reference_attention(q, k, v, plan, mask)).abs().max() < 3e-2
    assert max(c["query"].shape[0] for c in npu_emulation.calls) <= 6
