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

import dataclasses

import pytest
import torch

import lvsa
from lvsa.backends import fa4
from lvsa.backends.fa4 import Fa4Driver
from lvsa.backends.reference import reference_attention, token_mask
from lvsa.kernels import block_mask as tiles
from lvsa.kernels.block_mask import KEY_ORDERS, MASK_FORMS, block_tables, mask_mod_for, to_tiles
from lvsa.plan import PatternKnobs, build_plan

from ..conftest import required_devices
from ..parity.test_parity import CASES, _make

TILES = [1, 3, 4, 16, 128]
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


ORDERS_AND_FORMS = [*((order, "interval") for order in KEY_ORDERS), ("in-place", "table"), ("token", "table")]
assert {form for _, form in ORDERS_AND_FORMS} == set(MASK_FORMS)


@pytest.mark.parametrize(("key_order", "mask_form"), ORDERS_AND_FORMS)
@pytest.mark.parametrize("block", TILES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tiles_expand_to_the_plans_mask(case, block, key_order, mask_form):
    plan, _, _, _, padding = _make(case, "cpu", torch.float32)
    keep = None
    expected = token_mask(plan)[None].expand(case.batch, -1, -1).clone()
    if padding is not None:
        keep = torch.ones(case.batch, plan.seq_len, dtype=torch.bool)
        keep[:, plan.text_start : plan.text_start + plan.text_tokens] = padding
        expected &= keep[:, None, :]
    tables = block_tables(plan, block, "cpu", padded_text=keep is not None, key_order=key_order)
    layout = tables.layout
    # in the kernel's order: its query rows and key columns are tokens of the orders
    assert layout.queries.order is None  # queries stay in token order
    if layout.keys.order is not None:
        expected = expected[:, :, layout.keys.order]
        keep = None if keep is None else keep[:, layout.keys.order]
    if keep is not None:
        keep = to_tiles(keep, block)
    # every plan of the grid has the interval shape (globals, text, one window), so the fast form engages
    assert tables.intervals is not None
    mask_mod = mask_mod_for(tables, keep, mask_form)
    got = _expanded(plan, tables, mask_mod, case.batch)
    assert torch.equal(got, expected)
    # the kernel calls mask_mod on every position of a tile, past the sequence too: no index out of bounds
    # (on CPU an out-of-bounds index raises; on the GPU it read another allocation or faulted)
    whole = torch.arange(-(-plan.seq_len // block) * block)
    mask_mod(torch.arange(case.batch)[:, None, None], 0, whole[None, :, None], whole[None, None, :])
    if block == 1:  # one token per tile: every tile with an attended pair is full unless it holds padding
        assert int(tables.full_kv_num_blocks.sum()) == int(token_mask(plan).sum()) - (
            0 if keep is None else plan.seq_len * plan.text_tokens)


@pytest.mark.parametrize("key_order", KEY_ORDERS)
def test_orders_are_permutations_that_put_the_text_where_the_padding_is_written(key_order):
    for case in CASES:
        plan = _make(case, "cpu", torch.float32)[0]
        layout = block_tables(plan, 3, "cpu", padded_text=bool(plan.text_tokens), key_order=key_order).layout
        keys = torch.arange(plan.seq_len) if layout.keys.order is None else layout.keys.order
        assert torch.equal(keys.sort().values, torch.arange(plan.seq_len))
        text = torch.arange(plan.text_start, plan.text_start + plan.text_tokens)
        assert torch.equal(keys[layout.text_keys], text)
        if layout.keys.moved is not None:  # exactly the tokens the order moves, and where to
            kernel_positions, tokens = layout.keys.moved
            assert torch.equal(keys[kernel_positions], tokens) and not (kernel_positions == tokens).any()
            assert torch.equal(keys[keys != torch.arange(plan.seq_len)], tokens)
    assert (key_order != "token") == any(block_tables(_make(case, "cpu", torch.float32)[0], 3, "cpu", False, key_order)
                                         .layout.keys.order is not None for case in CASES)


def test_tiles_are_really_skipped_full_and_partial():
    """At Wan's 1560 tokens per frame and 128-token tiles: frame boundaries fall inside tiles in the token
    order (partial tiles); most attended tiles are full, and the rest are skipped: the kernel's work follows
    the plan's density. The reordered keys put frame boundaries on tile boundaries: far fewer partial tiles
    and almost no work beyond the density, the same tiles whether every token moves or only 3% do."""
    knobs = PatternKnobs(21, 1.0, 1, 1, None, None)
    plan = build_plan(81, 1560, knobs, step=3)
    ideal = plan.density * plan.seq_len**2 / 128**2
    shares = {}
    for key_order in KEY_ORDERS:
        tables = block_tables(plan, 128, "cpu", padded_text=False, key_order=key_order)
        tiles = tables.kv_num_blocks.shape[-1]
        full, partial = int(tables.full_kv_num_blocks.sum()), int(tables.kv_num_blocks.sum())
        assert partial > 0 and full > 0
        visited = (full + partial) / tiles**2
        assert abs(visited - plan.density) < 0.05, (visited, plan.density)
        shares[key_order] = partial / (full + partial), (full + partial) / ideal
    assert 0.05 < shares["token"][0] < 0.2 and shares["token"][1] > 1.04, shares
    assert shares["aligned"][0] < 0.02 and shares["aligned"][1] < 1.02, shares
    assert shares["in-place"] == shares["aligned"], shares
    moved = block_tables(plan, 128, "cpu", padded_text=False).layout.keys.moved[0]
    assert len(moved) < 0.04 * plan.seq_len, len(moved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize(("key_order", "mask_form"), ORDERS_AND_FORMS)
def test_driver_equals_the_reference_through_flex_attention(case, dtype, key_order, mask_form):
    plan, q, k, v, padding = _make(case, "cpu", dtype)
    driver = Fa4Driver(block=3, compiled=False, key_order=key_order, mask_form=mask_form, **CPU)
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding)
    assert not driver.check(problem)
    prepared = driver.prepare(plan, problem)
    if prepared.keep is not None:  # whole tiles (see test_tiles_expand_to_the_plans_mask)
        assert prepared.keep.shape == (case.batch, -(-plan.seq_len // 3) * 3)
    before = k.clone(), v.clone()
    out = driver.run(prepared, q, k, v, padding)
    expected = reference_attention(q, k, v, plan, padding)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-10)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])  # the caller's keys are back in place


def _in_place_case():
    """A sparse case with padded text whose keys are reordered in place at 3-token tiles (no GQA, so that q,
    k and v can be views of one tensor)."""
    for case in CASES:
        plan, q, k, _, padding = _make(case, "cpu", torch.float64)
        moved = block_tables(plan, 3, "cpu", bool(plan.text_tokens)).layout.keys.moved
        if moved is not None and padding is not None and q.shape == k.shape:
            return case
    raise AssertionError("no case of the grid moves keys in place")


@pytest.mark.parametrize("make_inputs", [
    pytest.param(lambda q, k, v: (q, k, k, "share memory"), id="k-is-v"),
    pytest.param(lambda q, k, v: (*torch.cat([q, k, v], -1).chunk(3, -1), "share memory"), id="views-of-one-qkv"),
    pytest.param(lambda q, k, v: (q, k[:, :, :1].expand_as(k), v, "share memory"), id="expanded-k"),
])
def test_keys_that_cannot_move_in_place_are_copied(make_inputs, caplog, monkeypatch):
    """Keys and values the driver may not write into (shared with q or each other, expanded) are copied into
    the kernel's order instead, with the reason logged, and the result is exact."""
    case = _in_place_case()
    plan, q, k, v, padding = _make(case, "cpu", torch.float64)
    q, k, v, reason = make_inputs(q, k, v)
    before = [t.detach().clone() for t in (q, k, v)]
    driver = Fa4Driver(block=3, compiled=False, **CPU)
    monkeypatch.setattr(fa4, "_copy_reasons", set())
    with caplog.at_level("INFO", logger="lvsa"):
        out = driver.run(driver.prepare(plan, lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding)),
                         q, k, v, padding)
    expected = reference_attention(*(t.detach() for t in (q, k, v)), plan, padding)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-10)
    assert all(torch.equal(t.detach(), b) for t, b in zip((q, k, v), before, strict=True))
    copied = [r.getMessage() for r in caplog.records if "copied into the kernel's order" in r.getMessage()]
    assert len(copied) == 1 and reason in copied[0], copied


def test_keys_autograd_or_inference_mode_would_refuse_are_not_written():
    q, k, v = (torch.randn(1, 6, 2, 4) for _ in range(3))
    assert fa4.in_place_refusal(q, k, v) is None
    for grad in range(3):  # autograd may have saved k and v for a backward: no write, in any grad mode
        inputs = [t.clone().requires_grad_(i == grad) for i, t in enumerate((q, k, v))]
        assert "requires grad" in fa4.in_place_refusal(*inputs)
        with torch.no_grad():
            assert "requires grad" in fa4.in_place_refusal(*inputs)
    with torch.inference_mode():
        made = torch.randn(1, 6, 2, 4)
        assert fa4.in_place_refusal(q, made, v) is None
    assert "inference mode" in fa4.in_place_refusal(q, made, v)


def test_keys_are_restored_when_the_kernel_fails(monkeypatch):
    case = _in_place_case()
    plan, q, k, v, padding = _make(case, "cpu", torch.float64)
    driver = Fa4Driver(block=3, compiled=False, **CPU)
    prepared = driver.prepare(plan, lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding))
    before = k.clone(), v.clone()
    seen = []

    def failing(prepared, q, k, v):
        seen.append(not torch.equal(k, before[0]))  # the kernel did see reordered keys
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(driver, "_attend", failing)
    with pytest.raises(RuntimeError, match="kernel failed"):
        driver.run(prepared, q, k, v, padding)
    assert seen == [True]
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_on_cuda_keys_move_in_place_with_real_tiles(dtype, monkeypatch):
    """On a GPU with FA4 (skipped elsewhere; required under LVSA_TEST_DEVICES=cuda): frames of 200 tokens
    (one whole 128-token tile and 72 more), padded text after the video, GQA, batch 2: the kernel's result
    equals the float64 reference, the keys were moved in the caller's tensors (no copy), and they are back."""
    status = lvsa.driver_status.driver_status("fa4", "cuda")
    if not status.available:
        if "cuda" in required_devices():
            pytest.fail(f"LVSA_TEST_DEVICES requires cuda: fa4 {status.reason}")
        pytest.skip(f"fa4 on cuda: {status.reason}")
    plan = build_plan(12, 200, PatternKnobs(4, 1.0, 1, 1, None, None), text_tokens=40, step=2)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, plan.seq_len, 4, 64, generator=gen)
    k, v = (torch.randn(2, plan.seq_len, 2, 64, generator=gen) for _ in range(2))
    padding = torch.arange(40)[None] < torch.tensor([[40], [25]])
    copies: list[str] = []
    monkeypatch.setattr(fa4, "log_copy_once", copies.append)
    on_gpu = [t.to("cuda", dtype) for t in (q, k, v)]
    before = [t.clone() for t in on_gpu]
    out = lvsa.sparse_attention(*on_gpu, plan, backend="fa4", key_padding_mask=padding.cuda())
    assert tiles.in_place_side(plan, 128, "cpu").moved is not None and not copies, copies
    assert all(torch.equal(t, b) for t, b in zip(on_gpu, before, strict=True))
    expected = reference_attention(*(t.cpu() for t in on_gpu), plan, padding)
    assert (out.cpu().double() - expected).abs().max().item() <= 3e-2


def test_a_table_without_the_interval_shape_keeps_the_table_form():
    """The interval form is derived from the group table and checked against it: a query group attending
    two separate runs of groups (not a plan lvsa makes, but a table of another shape) gets no intervals, and
    ``mask_mod`` then reads the table, exactly."""
    plan = build_plan(8, 5, PatternKnobs(2, 1.0, 1, 1, None, None), step=0)
    layout = tiles.tile_layout(plan, 4, "cpu")
    table = tiles.attended_groups(plan, "cpu")
    assert tiles.interval_mask(table, layout, 40) is not None
    holes = table.clone()
    holes[5] = False
    holes[5, [1, 2, 6, 7]] = True  # frame 0 (a global) dropped: not common; two runs left
    assert tiles.interval_mask(holes, layout, 40) is None
    tables = dataclasses.replace(block_tables(plan, 4, "cpu", padded_text=False), intervals=None)
    where = torch.arange(plan.seq_len)
    got = mask_mod_for(tables, None, "interval")(0, 0, where[:, None], where[None, :])
    expected = token_mask(plan)[:, layout.keys.order] if layout.keys.order is not None else token_mask(plan)
    assert torch.equal(got, expected)


def test_unknown_mask_form_is_refused():
    with pytest.raises(ValueError, match="mask_form 'bits' is not one of interval, table"):
        Fa4Driver(mask_form="bits")


def test_unknown_key_order_is_refused():
    with pytest.raises(ValueError, match="key_order 'aligned-keys' is not one of in-place, aligned, token"):
        Fa4Driver(key_order="aligned-keys")


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
    driver = Fa4Driver(block=16, compiled=True, **CPU)  # 24 tokens per frame: keys reordered in place
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
    status = lvsa.driver_status.driver_status("fa4", "cpu")
    assert not status.available and "runs on cuda" in status.reason
    driver = Fa4Driver()
    reason = driver.is_available("cuda").reason
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        assert "flash-attn-4" in reason and "lvsa[fa4]" in reason
