"""Every available driver on every available device against the float64 reference.

The grid covers the shapes that break sparse kernels: a single frame, fewer frames than a window, odd
tokens per frame, text before and after the video with padded text keys, GQA, batch > 1, rotation.
The reference runs on CPU copies in float64, so the same test serves CUDA and NPU hosts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import lvsa
import lvsa.driver_status
from lvsa import registry
from lvsa.backends.reference import reference_attention
from lvsa.plan import PatternKnobs, build_plan

pytestmark = pytest.mark.parity


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    P: int
    ref: int = 4
    W: int = 1
    n_first: int = 1
    kfi: int | None = None
    text: int = 0
    position: str = "after"
    padding: bool = False
    empty_sample: bool = False  # the last sample's text keys all padded (an empty negative prompt under CFG)
    batch: int = 1
    q_heads: int = 2
    kv_heads: int = 2
    head_dim: int = 128
    step: int = 0
    expect_sparse: bool = field(default=True, compare=False)


# head_dim 128 (and one 64) and P >= 4: sizes FlashInfer's tensor-core kernels take, so the GPU matrix
# exercises them (smaller head dims would only be skipped as unsupported there)
CASES = [
    Case("one-frame", T=1, P=4, expect_sparse=False),
    Case("fewer-frames-than-window", T=5, P=4, ref=2, W=3, expect_sparse=False),  # the window covers all
    Case("training-horizon-dense", T=6, P=4, ref=21, text=3, expect_sparse=False),
    Case("odd-P-gqa-batch2", T=12, P=7, batch=2, q_heads=4, kv_heads=2, step=3),
    Case("text-after-padded", T=10, P=4, text=5, padding=True, batch=2, step=1),
    Case("text-before-padded-mqa", T=9, P=5, ref=3, text=6, position="before", padding=True, batch=2,
         q_heads=4, kv_heads=1, step=5),
    Case("manual-interval-no-text", T=15, P=4, kfi=3, W=1, n_first=2, head_dim=64),
    Case("default-window-long", T=24, P=4, ref=8, W=3, text=4, padding=True, q_heads=3, kv_heads=1, step=7),
    # padding edge cases: a single text token (single-query calls with a mask), a sample with no valid text
    # key (split and dense plans, text before and after), one token per frame (single-query window calls)
    Case("one-text-token-padded", T=10, P=4, text=1, padding=True, batch=2, step=2),
    Case("text-after-one-sample-empty", T=10, P=4, text=5, padding=True, empty_sample=True, batch=2, step=1),
    Case("text-before-one-sample-empty-gqa", T=9, P=4, ref=3, text=6, position="before", padding=True,
         empty_sample=True, batch=2, q_heads=4, kv_heads=2, step=4),
    Case("dense-one-sample-empty", T=6, P=4, ref=21, text=3, padding=True, empty_sample=True, batch=2,
         expect_sparse=False),
    Case("one-token-per-frame", T=12, P=1, text=2, padding=True, batch=2, step=3),
    Case("one-token-per-frame-one-text-before", T=12, P=1, text=1, position="before", padding=True, batch=2),
]

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _make(case: Case, device: str, dtype: torch.dtype, seed: int = 0):
    knobs = PatternKnobs(case.ref, 1.0, case.W, case.n_first, case.kfi, None)
    plan = build_plan(case.T, case.P, knobs, text_tokens=case.text, text_position=case.position, step=case.step)
    gen = torch.Generator().manual_seed(seed)
    S = plan.seq_len
    q = torch.randn(case.batch, S, case.q_heads, case.head_dim, generator=gen)
    k = torch.randn(case.batch, S, case.kv_heads, case.head_dim, generator=gen)
    v = torch.randn(case.batch, S, case.kv_heads, case.head_dim, generator=gen)
    mask = None
    if case.padding:
        valid = torch.randint(1, case.text + 1, (case.batch,), generator=gen)
        mask = torch.arange(case.text)[None, :] < valid[:, None]  # valid text first, padding last
        mask[0, -1] = False  # at least one padded key
        if case.empty_sample:
            mask[-1] = False
    to = dict(device=device, dtype=dtype)
    return plan, q.to(**to), k.to(**to), v.to(**to), None if mask is None else mask.to(device)


def usable_target(parity_target, backends_required, request):
    """``(device, driver, dtype)``, with the npu emulation installed on CPU; skipped (or failed, when
    ``LVSA_TEST_BACKENDS`` requires it) where the driver cannot run."""
    device, backend, _ = parity_target
    if backend == "npu" and device == "cpu":
        request.getfixturevalue("npu_emulation")
    status = lvsa.driver_status.driver_status(backend, device)
    if not status.available:
        if backend in backends_required:
            pytest.fail(f"LVSA_TEST_BACKENDS requires {backend} on {device}: {status.reason}")
        pytest.skip(f"{backend} on {device}: {status.reason}")
    return parity_target


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_driver_matches_reference(parity_target, case, backends_required, request):
    device, backend, dtype = usable_target(parity_target, backends_required, request)
    plan, q, k, v, mask = _make(case, device, dtype)
    assert plan.is_dense != case.expect_sparse, plan.summary()
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, mask)
    unsupported = registry.drivers()[backend].check(problem)
    if unsupported:
        pytest.skip(f"{backend} does not support this case: {'; '.join(unsupported)}")

    inputs = [t.clone() for t in (q, k, v)]
    out = lvsa.sparse_attention(q, k, v, plan, backend=backend, key_padding_mask=mask)
    expected = reference_attention(*(t.cpu() for t in (q, k, v)), plan, None if mask is None else mask.cpu())
    # a driver may reorder the caller's tensors during the call (fa4), never leave them changed
    assert all(torch.equal(t, before) for t, before in zip((q, k, v), inputs, strict=True))

    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    error = (out.cpu().double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max abs error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def test_reference_differs_from_dense_when_sparse():
    """The matrix would be meaningless if the mask had no effect: check the reference itself."""
    plan, q, k, v, _ = _make(CASES[3], "cpu", torch.float32)
    sparse = reference_attention(q, k, v, plan)
    dense_plan = build_plan(plan.latent_frames, plan.patches_per_frame, PatternKnobs(99, 1.0, 1, 1, None, None))
    dense = reference_attention(q, k, v, dense_plan)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2)
    ).transpose(1, 2)
    assert torch.allclose(dense.float(), expected, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-2


def test_padding_mask_changes_the_output():
    case = CASES[4]
    plan, q, k, v, mask = _make(case, "cpu", torch.float32)
    with_mask = lvsa.sparse_attention(q, k, v, plan, backend="sdpa", key_padding_mask=mask)
    without = lvsa.sparse_attention(q, k, v, plan, backend="sdpa")
    assert (with_mask - without).abs().max() > 1e-3
