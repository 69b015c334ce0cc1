"""The fa4 driver's plan-to-tiles logic on CPU, where no FA4 kernel runs.

- The tiles, expanded back into a token mask (full tile: every pair; partial tile: ``mask_mod``; skipped
  tile: none), equal the plan's token mask and the padding for every case of the parity grid and tile sizes
  from 1 token to larger than the sequence: a full tile never hides a masked pair, a skipped tile never
  drops an attended one.
- The driver, with FlexAttention's CPU paths in place of the FLASH backend, equals the float64 reference
  over the parity grid (padding, GQA, batch > 1, text before and after, empty samples).
- Compiled (the CPU FlexAttention kernel, which does skip tiles), a generation's rotating plans reuse one
  compiled kernel."""

from __future__ import annotations

import pytest
import torch

import lvsa
from lvsa.backends.fa4 import Fa4Driver, _to_tiles, block_tables, mask_mod_for
from lvsa.backends.reference import reference_attention, token_mask
from lvsa.plan import PatternKnobs, build_plan

from ..parity.test_parity import CASES, _make

TILES = [1, 3, 4, 16, 128]
ALIGN = [False, True]
CPU = dict(kernel_backend=None, devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32, torch.float64}))


def _expanded(plan, tables, mask_mod, batch):
    """The token mask a FlexAttention kernel applies for these tiles, built tile by tile."""
    S, block = plan.seq_len, tables.block
    tiles = tables.kv_num_blocks.shape[-1]
    b = torch.arange(batch)[:, None, None]
    mask = torch.zeros(batch, S, S, dtype=torch.bool)
    for qt in range(tiles):
        rows = slice(qt * block, min(S, (qt + 1) * block))
        for kt in tables.full_kv_indices[0, 0, qt, : tables.full_kv_num_blocks[0, 0, qt]].tolist():
            mask[:, rows, kt * block : min(S, (kt + 1) * block)] = True
        for kt in tables.kv_indices[0, 0, qt, : tables.kv_num_blocks[0, 0, qt]].tolist():
            cols = slice(kt * block, min(S, (kt + 1) * block))
            q = torch.arange(S)[rows][None, :, None]
            k = torch.arange(S)[cols][None, None, :]
            mask[:, rows, cols] = mask_mod(b, 0, q, k)
    return mask


@pytest.mark.parametrize("align_keys", ALIGN, ids=["token-order", "aligned-keys"])
@pytest.mark.parametrize("block", TILES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tiles_expand_to_the_plans_mask(case, block, align_keys):
    plan, _, _, _, padding = _make(case, "cpu", torch.float32)
    keep = None
    expected = token_mask(plan)[None].expand(case.batch, -1, -1).clone()
    if padding is not None:
        keep = torch.ones(case.batch, plan.seq_len, dtype=torch.bool)
        keep[:, plan.text_start : plan.text_start + plan.text_tokens] = padding
        expected &= keep[:, None, :]
    tables = block_tables(plan, block, "cpu", padded_text=keep is not None, align_keys=align_keys)
    layout = tables.layout
    # in the kernel's order: its query rows and key columns are tokens of the orders
    assert layout.queries.order is None  # queries stay in token order
    if layout.keys.order is not None:
        expected = expected[:, :, layout.keys.order]
        keep = None if keep is None else keep[:, layout.keys.order]
    if keep is not None:
        keep = _to_tiles(keep, block)
    mask_mod = mask_mod_for(tables, keep)
    got = _expanded(plan, tables, mask_mod, case.batch)
    assert torch.equal(got, expected)
    # the kernel calls mask_mod on every position of a tile, past the sequence too: no index out of bounds
    # (on CPU an out-of-bounds index raises; on the GPU it read another allocation or faulted)
    whole = torch.arange(-(-plan.seq_len // block) * block)
    mask_mod(torch.arange(case.batch)[:, None, None], 0, whole[None, :, None], whole[None, None, :])
    if block == 1:  # one token per tile: every tile with an attended pair is full unless it holds padding
        assert int(tables.full_kv_num_blocks.sum()) == int(token_mask(plan).sum()) - (
            0 if keep is None else plan.seq_len * plan.text_tokens)


@pytest.mark.parametrize("align_keys", ALIGN, ids=["token-order", "aligned-keys"])
def test_orders_are_permutations_that_put_the_text_where_the_padding_is_written(align_keys):
    for case in CASES:
        plan = _make(case, "cpu", torch.float32)[0]
        layout = block_tables(plan, 3, "cpu", padded_text=bool(plan.text_tokens), align_keys=align_keys).layout
        keys = torch.arange(plan.seq_len) if layout.keys.order is None else layout.keys.order
        assert torch.equal(keys.sort().values, torch.arange(plan.seq_len))
        text = torch.arange(plan.text_start, plan.text_start + plan.text_tokens)
        assert torch.equal(keys[layout.text_keys], text)
    assert align_keys == any(block_tables(_make(case, "cpu", torch.float32)[0], 3, "cpu", False, align_keys)
                             .layout.keys.order is not None for case in CASES)


def test_tiles_are_really_skipped_full_and_partial():
    """At Wan's 1560 tokens per frame and 128-token tiles: frame boundaries fall inside tiles in the token
    order (partial tiles); most attended tiles are full, and the rest are skipped: the kernel's work follows
    the plan's density. The aligned key order puts frame boundaries on tile boundaries: far fewer partial
    tiles and almost no work beyond the density."""
    knobs = PatternKnobs(21, 1.0, 1, 1, None, None)
    plan = build_plan(81, 1560, knobs, step=3)
    ideal = plan.density * plan.seq_len**2 / 128**2
    shares = {}
    for align_keys in ALIGN:
        tables = block_tables(plan, 128, "cpu", padded_text=False, align_keys=align_keys)
        tiles = tables.kv_num_blocks.shape[-1]
        full, partial = int(tables.full_kv_num_blocks.sum()), int(tables.kv_num_blocks.sum())
        assert partial > 0 and full > 0
        visited = (full + partial) / tiles**2
        assert abs(visited - plan.density) < 0.05, (visited, plan.density)
        shares[align_keys] = partial / (full + partial), (full + partial) / ideal
    assert 0.05 < shares[False][0] < 0.2 and shares[False][1] > 1.04, shares
    assert shares[True][0] < 0.02 and shares[True][1] < 1.02, shares


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("align_keys", ALIGN, ids=["token-order", "aligned-keys"])
def test_driver_equals_the_reference_through_flex_attention(case, dtype, align_keys):
    plan, q, k, v, padding = _make(case, "cpu", dtype)
    driver = Fa4Driver(block=3, compiled=False, align_keys=align_keys, **CPU)
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding)
    assert not driver.check(problem)
    prepared = driver.prepare(plan, problem)
    if prepared.keep is not None:  # whole tiles (see test_tiles_expand_to_the_plans_mask)
        assert prepared.keep.shape == (case.batch, -(-plan.seq_len // 3) * 3)
    out = driver.run(prepared, q, k, v, padding)
    expected = reference_attention(q, k, v, plan, padding)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-10)


def test_custom_scale_reaches_the_kernel():
    plan, q, k, v, padding = _make(CASES[4], "cpu", torch.float64)
    driver = Fa4Driver(block=4, compiled=False, **CPU)
    prepared = driver.prepare(plan, lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding, scale=0.05))
    out = driver.run(prepared, q, k, v, padding)
    torch.testing.assert_close(out, reference_attention(q, k, v, plan, padding, scale=0.05))


@pytest.mark.slow
def test_compiled_cpu_kernel_skips_tiles_and_is_reused_across_rotation():
    """The CPU FlexAttention kernel (torch.compile) honours the tiles; rotating plans change data, not shapes."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    driver = Fa4Driver(block=16, compiled=True, **CPU)  # 24 tokens per frame: keys aligned
    knobs = PatternKnobs(4, 1.0, 1, 1, None, None)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        plan = build_plan(16, 24, knobs, text_tokens=10, step=step)
        q, k, v = (torch.randn(1, plan.seq_len, 2, 64, generator=gen) for _ in range(3))
        padding = torch.arange(10)[None] < 7
        out = driver.run(driver.prepare(plan, lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding)),
                         q, k, v, padding)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, plan, padding), rtol=0, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_availability_names_what_is_missing():
    status = lvsa.dispatch.driver_status("fa4", "cpu")
    assert not status.available and "runs on cuda" in status.reason
    driver = Fa4Driver()
    reason = driver.is_available("cuda").reason
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        assert "flash-attn-4" in reason and "lvsa[fa4]" in reason
