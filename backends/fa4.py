"""FlashAttention-4 block-sparse attention on CUDA (Hopper sm90, Blackwell sm100), through torch's FlexAttention
with ``kernel_options={"BACKEND": "FLASH"}``, which compiles the mask into FA4's CuTe DSL kernel.

The plan becomes a FlexAttention ``BlockMask`` over ``block x block`` tiles of the kernel's sequence (video
and text). Tokens belong to *groups*: one per latent frame, and one for the text; a ``[G, G]`` boolean table
says which query group attends which key group (the plan's frames; text queries attend everything, every
query attends the text). A tile is

- *full* when every (query, key) pair in it is attended: the kernel skips the mask there;
- *partial* when only some are (a tile holds parts of several groups, or padded text keys): the kernel
  evaluates ``mask_mod`` at each of its positions; reading the group table there made a partial tile cost
  about three full ones on an H100, so ``mask_mod`` compares a key's group with the query's window bounds
  instead (:func:`interval_mask`, :func:`mask_mod_for`);
- skipped otherwise.

**Reordered keys.** A frame rarely fills whole tiles (Wan: 1560 tokens = 12 x 128 + 24), so in token order
about one visited tile in ten is partial. The keys and values are therefore reordered so that every tile
holds one frame's tokens, or frames' short remainders (the global frames' first), or text. Then under 2% of
the visited tiles are partial and the work is within 1-2% of the density. The order that does it with the
fewest moves (:func:`in_place_side`) keeps every tile that lies inside one frame where it is, and moves
about 3% of the tokens; the driver moves them in the caller's k and v, runs the kernel, and moves them back
(0.1 ms at Wan 4x, where copying every token took 0.55 ms and 0.8 GB). Where the caller's tensors cannot
be written (inside ``torch.compile``, q, k or v requiring grad, k and v sharing memory with each other or
q), it copies them into that order instead and logs why once. The queries stay in token order, so the
output needs no copy back.

The tiles are classified on the device in a few vectorised operations (group counts per tile, times the
group table), once per plan: rotation changes these tensors once per step. Shapes and the kernel's constants
depend only on the geometry, so the compiled kernel is reused across the steps of a generation. A dense plan
without padded text runs FA4's dense kernel (no block mask).

Install with ``pip install 'lvsa[fa4]'``. The first call of a shape compiles the kernel (several seconds,
logged once per shape)."""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lvsa import log, registry
from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.errors import DriverUnavailable
from lvsa.plan import SparsePlan

#: what each missing piece is called in pip terms
_PACKAGES = {
    "flash_attn.cute": "flash-attn-4",
    "cutlass": "nvidia-cutlass-dsl",
    "quack": "quack-kernels",
}
_compiled: set[tuple[Any, ...]] = set()
_lock = threading.Lock()
#: kernels (shapes, masks) compiled per process before fa4 refuses
_SHAPES_PER_PROCESS = 64


Slot = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Side:
    """One side (queries or keys) of the kernel's sequence: which token sits at each kernel position, and the
    *slot* of a position, in index arithmetic. A slot is a run of positions of one group (a frame's whole
    tiles, a frame's remainder, the text); ``slot_groups`` gives each slot's group. The slot formula is the
    one rule that the tile classification (vectorised over positions) and the kernel's ``mask_mod`` (per
    position; its Python ints are constants of the compiled kernel) share; positions past the sequence, which
    the kernel also passes to ``mask_mod``, map to a valid slot."""

    #: ``[S]`` long: kernel position -> token position (None: the token order)
    order: torch.Tensor | None
    slot: Slot
    #: ``[slots]`` long; a rotated plan changes its values, not its shape
    slot_groups: torch.Tensor
    #: ``(kernel positions, token positions)`` of the tokens that ``order`` moves, where that is few enough to
    #: move them in the caller's tensors and back (see :func:`in_place_side`); None: copy through ``order``
    moved: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class TileLayout:
    queries: Side
    keys: Side
    #: the kernel key positions of the text tokens, in text order (where the padding mask is written)
    text_keys: slice | torch.Tensor


@dataclass(frozen=True)
class IntervalMask:
    """The group table as per-position bounds, where it has that shape (:func:`interval_mask`): a query
    position attends a key position when the key's code is negative (a group that every query group
    attends: the global frames, the text) or lies in the query's ``[lo, hi]`` (its window's groups). Every
    tensor covers whole tiles (``int32``): the kernel reads them past the sequence too."""

    query_lo: torch.Tensor
    query_hi: torch.Tensor
    key_code: torch.Tensor


@dataclass(frozen=True)
class BlockTables:
    """The plan as tiles: FlexAttention's ``from_kv_blocks`` arguments (``[1, 1, query tiles, ...]`` int32)."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    block: int
    #: ``[query slots, key slots]`` bool: the group table at the slots' groups
    attended: torch.Tensor
    layout: TileLayout
    #: the same table as bounds (None where the table has no such shape)
    intervals: IntervalMask | None = None


@dataclass(frozen=True)
class Fa4Prepared(Prepared):
    #: None: dense plan without padded text keys (FA4's dense kernel)
    block_mask: Any
    #: ``[B, tiles x block]`` bool over kernel key positions, True = key kept; the text's entries are rewritten
    #: from the padding mask at every call (None: no padding)
    keep: torch.Tensor | None
    layout: TileLayout | None


class Groups(NamedTuple):
    """Groups are numbered in token order: the text's is first when the text comes before the video and last
    when after (-1 without text), so the frames start at ``first_frame``."""

    count: int
    text_group: int
    first_frame: int


def group_layout(plan: SparsePlan) -> Groups:
    T = plan.latent_frames
    if not plan.text_tokens:
        return Groups(T, -1, 0)
    before = plan.text_position == "before"
    return Groups(T + 1, 0 if before else T, 1 if before else 0)


def token_side(plan: SparsePlan, device: torch.device | str) -> Side:
    """The token order: one slot per group (a frame, the text)."""
    P, vs, V, T = plan.patches_per_frame, plan.video_start, plan.video_tokens, plan.latent_frames
    groups, text_group, first = group_layout(plan)

    # only what FA4's CuTe code generation lowers: arithmetic, comparisons, where (no clamp or maximum)
    def slot(x: torch.Tensor) -> torch.Tensor:
        if text_group < 0:
            return torch.where(x < V, x // P, T - 1)
        return torch.where((x >= vs) & (x < vs + V), (x - vs) // P + first, text_group)

    return Side(None, slot, torch.arange(groups, device=device))


def _remainder_frames(plan: SparsePlan) -> torch.Tensor:
    """The order of the frames' remainders in the reordered keys: the global frames' first, so that the
    remainders a query frame attends (its globals and its window) share few tiles, then the others."""
    is_global = set(plan.globals)
    return torch.tensor([*plan.globals, *(f for f in range(plan.latent_frames) if f not in is_global)])


def _reordered_slot_groups(plan: SparsePlan, device: torch.device | str) -> torch.Tensor:
    """The groups of the reordered keys' slots: ``T`` frames' whole tiles, ``T`` remainders, the text."""
    T, (_, text_group, first) = plan.latent_frames, group_layout(plan)
    slot_groups = torch.cat([torch.arange(T) + first, _remainder_frames(plan) + first,
                             torch.tensor([max(text_group, 0)])])
    return slot_groups.to(device)


def _reorders(plan: SparsePlan, block: int) -> bool:
    """Whether reordering the keys helps: frames with whole tiles and a remainder, in a sparse plan (frames
    of whole tiles, frames shorter than a tile, or a dense plan: the token order is as good)."""
    P = plan.patches_per_frame
    return P >= block and P % block != 0 and not plan.is_dense


def aligned_side(plan: SparsePlan, block: int, device: torch.device | str) -> Side | None:
    """The order that puts frame boundaries on tile boundaries: every frame's whole tiles (``P // block`` of
    them) in frame order, then the frames' remainders (``P % block`` tokens each, see
    :func:`_remainder_frames`), then the text. Slots: ``T`` frames' whole tiles, ``T`` remainders, the text.
    None where the token order is as good (:func:`_reorders`). Every token moves: the driver copies k and v."""
    if not _reorders(plan, block):
        return None
    P, T, vs = plan.patches_per_frame, plan.latent_frames, plan.video_start
    whole, rest = P // block * block, P % block
    main_tokens = vs + torch.arange(T)[:, None] * P + torch.arange(whole)[None]
    rest_tokens = vs + _remainder_frames(plan)[:, None] * P + torch.arange(whole, P)[None]
    text = torch.arange(plan.text_start, plan.text_start + plan.text_tokens)
    order = torch.cat([main_tokens.flatten(), rest_tokens.flatten(), text]).to(device)
    main_end, video_end = T * whole, T * P

    def slot(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < main_end, x // whole, torch.where(x < video_end, T + (x - main_end) // rest, 2 * T))

    return Side(order, slot, _reordered_slot_groups(plan, device))


def in_place_side(plan: SparsePlan, block: int, device: torch.device | str) -> Side | None:
    """The aligned order's kind of tiles (every tile holds one frame's tokens, or remainders in the order of
    :func:`_remainder_frames`, or text) reached by moving few tokens: a tile that lies inside one group
    (a frame, the text) stays where it is; a group one whole tile short takes over a tile it shares with a
    neighbour; the tiles nobody takes hold the remainders. About 3% of the tokens move at Wan's and
    HunyuanVideo's frame sizes, so the driver moves them in the caller's k and v and back rather than
    copying every token. The slot of a key position reads its tile's entry in a small table. None where
    the token order is as good (:func:`_reorders`)."""
    if not _reorders(plan, block):
        return None
    S, T, rest = plan.seq_len, plan.latent_frames, plan.patches_per_frame % block
    groups, text_group, first = group_layout(plan)
    lengths = torch.full((groups,), plan.patches_per_frame)
    if text_group >= 0:
        lengths[text_group] = plan.text_tokens
    ends = lengths.cumsum(0)
    starts = ends - lengths
    group_of = torch.repeat_interleave(torch.arange(groups), lengths)  # token -> group
    tiles = -(-S // block)
    tile_start = torch.arange(tiles) * block
    whole_tile = tile_start + block <= S
    tile_end = torch.where(whole_tile, tile_start + block, S) - 1
    single = whole_tile & (group_of[tile_start] == group_of[tile_end])
    owner = torch.where(single, group_of[tile_start], -1)  # the group whose whole tile it is; -1: remainders
    have = torch.bincount(owner[owner >= 0], minlength=groups)
    # a group one tile short (it starts and ends inside tiles) takes the neighbouring tile holding more of its
    # tokens; from the right, so that its left neighbour tile is always free (earlier groups have not chosen)
    # and a whole tile (only the sequence's last tile is short, and a group ending there can take its left)
    for g in reversed(range(groups)):
        if have[g] == lengths[g] // block:
            continue
        s, e = int(starts[g]), int(ends[g])
        free = [t for t in ((e - 1) // block, s // block) if owner[t] < 0 and whole_tile[t]]
        owner[max(free, key=lambda t: min(e, (t + 1) * block) - max(s, t * block))] = g
    tokens = torch.arange(S)
    stays = owner[tokens // block] == group_of
    order = torch.where(stays, tokens, -1)
    # a group's tokens outside its tiles fill the free places of its tiles, in token order; the rest are its
    # remainder and go to the tiles nobody owns, in the remainder order, the text's last
    loose = tokens[~stays]
    free_places = tokens[(owner[tokens // block] >= 0) & ~stays]
    free_places = free_places[torch.argsort(owner[free_places // block], stable=True)]
    places_per_group = torch.bincount(owner[free_places // block], minlength=groups)
    loose_group = group_of[loose]
    loose_per_group = torch.bincount(loose_group, minlength=groups)
    first_loose = loose_per_group.cumsum(0) - loose_per_group
    fills = (torch.arange(len(loose)) - first_loose[loose_group]) < places_per_group[loose_group]
    order[free_places] = loose[fills]
    remainder_rank = torch.full((groups,), T)  # the text after every frame
    remainder_rank[_remainder_frames(plan) + first] = torch.arange(T)
    remainders = loose[~fills]
    remainders = remainders[torch.argsort(remainder_rank[group_of[remainders]], stable=True)]
    order[order < 0] = remainders  # the unowned tiles' positions, in position order
    slot_of_group = torch.arange(groups) - first
    if text_group >= 0:
        slot_of_group[text_group] = 2 * T
    unowned = owner < 0
    tile_code = torch.where(unowned, -torch.cumsum(unowned.long(), 0), slot_of_group[owner.clamp(min=0)])
    tile_code = tile_code.to(device, torch.int32)  # an index of the kernel's width: CuTe rejects an Int64 one

    # for a remainder tile, -(its rank among them + 1): the position's place among the remainders is z
    def slot(x: torch.Tensor) -> torch.Tensor:
        code = tile_code[x // block]
        z = (-code - 1) * block + x - x // block * block
        return torch.where(code >= 0, code, torch.where(z < T * rest, T + z // rest, 2 * T))

    moved = order != tokens
    return Side(order.to(device), slot, _reordered_slot_groups(plan, device),
                (tokens[moved].to(device), order[moved].to(device)))


_KEY_SIDES: dict[str, Callable[[SparsePlan, int, torch.device | str], Side | None]] = {
    "in-place": in_place_side, "aligned": aligned_side, "token": lambda *_: None}
#: the orders the keys and values can take (see :func:`tile_layout`)
KEY_ORDERS = tuple(_KEY_SIDES)


def _key_side(key_order: str) -> Callable[[SparsePlan, int, torch.device | str], Side | None]:
    if key_order not in _KEY_SIDES:
        raise ValueError(f"fa4: key_order {key_order!r} is not one of {', '.join(KEY_ORDERS)}")
    return _KEY_SIDES[key_order]


def tile_layout(plan: SparsePlan, block: int, device: torch.device | str, key_order: str = "in-place") -> TileLayout:
    """Queries in token order; keys and values in ``key_order`` where it reorders them (see
    :func:`in_place_side`, :func:`aligned_side`; "token": none). Reordering the queries as well was measured
    slower: it copies q and the output too, and each remainder query tile holds several frames, so it visits
    the union of their keys through the mask."""
    tokens = token_side(plan, device)
    keys = _key_side(key_order)(plan, block, device)
    text = slice(plan.text_start, plan.text_start + plan.text_tokens)
    if keys is None:
        return TileLayout(tokens, tokens, text)
    return TileLayout(tokens, keys, torch.argsort(keys.order)[text])


def attended_groups(plan: SparsePlan, device: torch.device | str) -> torch.Tensor:
    """``[G, G]`` bool: the plan's frame pattern, plus the text group attending and attended by everything."""
    groups, text_group, first_frame = group_layout(plan)
    T, L = plan.latent_frames, plan.attended_per_frame
    table = torch.zeros(groups, groups, dtype=torch.bool)
    rows = torch.arange(T).repeat_interleave(L) + first_frame
    cols = torch.tensor(plan.indices, dtype=torch.long) + first_frame
    table[rows, cols] = True
    if text_group >= 0:
        table[text_group, :] = True
        table[:, text_group] = True
    return table.to(device)


def _tile_counts(side: Side, S: int, block: int, groups: int) -> torch.Tensor:
    """``[tiles, G]`` float64: how many tokens of each group a tile of this side holds."""
    positions = torch.arange(S, device=side.slot_groups.device)
    counts = torch.zeros(-(-S // block), groups, dtype=torch.float64, device=positions.device)
    ones = torch.ones(S, dtype=torch.float64, device=positions.device)
    counts.index_put_((positions // block, side.slot_groups[side.slot(positions)]), ones, accumulate=True)
    return counts


def block_tables(plan: SparsePlan, block: int, device: torch.device | str, padded_text: bool,
                 key_order: str = "in-place") -> BlockTables:
    """Classify every ``block x block`` tile of the kernel's sequence as full, partial or skipped (see the
    module): the attended pairs of a tile are its query tile's group counts times the group table times its
    key tile's group counts (exact in float64)."""
    groups_table = attended_groups(plan, device)
    layout = tile_layout(plan, block, device, key_order)
    groups, text_group, _ = group_layout(plan)
    rows = _tile_counts(layout.queries, plan.seq_len, block, groups)
    cols = _tile_counts(layout.keys, plan.seq_len, block, groups)
    pairs = rows @ groups_table.double() @ cols.T
    full = pairs == rows.sum(1)[:, None] * cols.sum(1)[None, :]
    if padded_text and text_group >= 0:
        full &= (cols[:, text_group] == 0)[None, :]  # a padded text key must go through the mask
    partial = (pairs > 0) & ~full

    def csr(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = selected.sum(-1, dtype=torch.int32)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count[None, None], order[None, None]

    kv_num, kv_idx = csr(partial)
    full_num, full_idx = csr(full)
    slots = groups_table[layout.queries.slot_groups][:, layout.keys.slot_groups]
    intervals = interval_mask(groups_table, layout, -(-plan.seq_len // block) * block)
    return BlockTables(kv_num, kv_idx, full_num, full_idx, block, slots, layout, intervals)


def interval_mask(groups_table: torch.Tensor, layout: TileLayout, positions: int) -> IntervalMask | None:
    """The group table as bounds (see :class:`IntervalMask`) when every query group attends the groups that
    all of them attend plus one run of consecutive groups: the plan's globals and text, and its window (the
    groups are numbered in token order). Checked against the table itself, so a pattern of another shape
    gets None (the table form) rather than a wrong mask."""
    groups = groups_table.shape[0]
    common = groups_table.all(0)
    rest = groups_table & ~common
    index = torch.arange(groups, device=groups_table.device)
    lo = torch.where(rest, index, groups).amin(1)
    hi = torch.where(rest, index, -1).amax(1)
    inside = (index[None] >= lo[:, None]) & (index[None] <= hi[:, None])
    if not torch.equal(common[None] | inside, groups_table):
        return None
    where = torch.arange(positions, device=groups_table.device)
    query_group = layout.queries.slot_groups[layout.queries.slot(where)]
    key_group = layout.keys.slot_groups[layout.keys.slot(where)]
    return IntervalMask(lo[query_group].int(), hi[query_group].int(),
                        torch.where(common[key_group], -1, key_group).int())


#: how ``mask_mod`` reads the plan: "interval" compares a key's code with the query's bounds; "table" reads
#: the slot table at the positions' slots (see :func:`mask_mod_for`)
MASK_FORMS = ("interval", "table")


def _mask_form(form: str) -> str:
    if form not in MASK_FORMS:
        raise ValueError(f"fa4: mask_form {form!r} is not one of {', '.join(MASK_FORMS)}")
    return form


def mask_mod_for(tables: BlockTables, keep: torch.Tensor | None, form: str = "interval") -> Callable[..., Any]:
    """``mask_mod(b, h, q, k)`` over kernel positions. FA4 evaluates it at every position of a partial tile,
    so its cost per position counts. The "interval" form makes three independent reads, each of ``q`` or ``k``
    alone, and compares; the "table" form computes both slots (a read of the key tile's code, divisions) and
    then reads the table at an address made of both. The interval form measured 3-4% faster on an H100 at
    Wan 4x, ``sparsity_scale`` 0.5 (docs/performance.md). It needs :attr:`BlockTables.intervals` (else the
    table). The tensors are the compiled kernel's captured buffers, so a rotated plan changes data, not the
    kernel; ``keep`` covers whole tiles."""
    intervals = tables.intervals if _mask_form(form) == "interval" else None
    if intervals is not None:
        lo, hi, code = intervals.query_lo, intervals.query_hi, intervals.key_code

        def inside(q, k):
            key = code[k]
            return (key < 0) | ((key >= lo[q]) & (key <= hi[q]))
    else:
        attended, query_slot, key_slot = tables.attended, tables.layout.queries.slot, tables.layout.keys.slot

        def inside(q, k):
            return attended[query_slot(q), key_slot(k)]
    if keep is None:
        def mask_mod(b, h, q, k):
            return inside(q, k)
    else:
        def mask_mod(b, h, q, k):
            return inside(q, k) & keep[b, k]
    return mask_mod


def _to_tiles(values: torch.Tensor, block: int) -> torch.Tensor:
    """``values`` padded with zeros (a dropped key) to whole tiles along the last dimension: the kernel calls
    ``mask_mod`` on every position of a tile, including those past the sequence, before it masks them, and an
    index past a captured tensor's end reads out of bounds."""
    return torch.nn.functional.pad(values, (0, -values.shape[-1] % block))


class Fa4Driver(Driver[Fa4Prepared]):
    name = "fa4"
    priority = 40
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = frozenset({64, 96, 128})

    def __init__(self, block: int = 128, kernel_backend: str | None = "FLASH", compiled: bool = True,
                 devices: frozenset[str] | None = None, dtypes: frozenset[Any] | None = None,
                 key_order: str = "in-place", mask_form: str = "interval") -> None:
        """The defaults are the CUDA driver. ``kernel_backend=None, compiled=False`` with CPU devices and any
        dtype runs the same block mask through FlexAttention's reference path: the tests check the tiles that
        way on machines without a GPU. ``key_order`` is one of :data:`KEY_ORDERS` (the others for comparison:
        see :func:`tile_layout`); ``mask_form`` one of :data:`MASK_FORMS` (see :func:`mask_mod_for`)."""
        _key_side(key_order)  # an unknown order fails here, not at the first call
        self.block = block
        self.key_order = key_order
        self.mask_form = _mask_form(mask_form)
        self.kernel_options = {"BACKEND": kernel_backend} if kernel_backend else None
        self.compiled = compiled
        if devices is not None:
            self.devices = devices
        if dtypes is not None:
            self.dtypes = dtypes

    def is_available(self, device_type: str) -> Availability:
        base = super().is_available(device_type)
        if not base:
            return base
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError:
            return Availability.no(f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)")
        if self.kernel_options is None:
            return Availability.yes("FlexAttention block mask (reference path)")
        if not _has_flash_backend():
            return Availability.no(f"torch {torch.__version__}'s FlexAttention has no FLASH backend (FA4)")
        missing = [f"{_PACKAGES[m]} ({m})" for m in _PACKAGES if not _importable(m)]
        if missing:
            return Availability.no(f"not installed: {', '.join(missing)} (pip install 'lvsa[fa4]')")
        if not _cutlass_libraries():
            return Availability.no("nvidia-cutlass-dsl's CUDA libraries are missing "
                                   "(pip install 'nvidia-cutlass-dsl-libs-cu13', or 'lvsa[fa4]')")
        present, (major, minor) = registry.device_capability("cuda")
        if not present:
            return present
        if major not in (9, 10):
            return Availability.no(f"FA4 runs on Hopper (sm90) and Blackwell (sm100); this GPU is sm{major}{minor}")
        return Availability.yes(f"FlashAttention-4 block-sparse through FlexAttention (sm{major}{minor})")

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> Fa4Prepared:
        device = torch.device(problem.device_type, problem.device_index)
        keep = None
        if problem.has_padding_mask:
            keep = _to_tiles(torch.ones(problem.batch, plan.seq_len, dtype=torch.bool, device=device), self.block)
        block_mask = layout = None
        if not plan.is_dense or keep is not None:
            from torch.nn.attention.flex_attention import BlockMask

            tables = block_tables(plan, self.block, device, padded_text=keep is not None,
                                  key_order=self.key_order)
            S, layout = plan.seq_len, tables.layout
            block_mask = BlockMask.from_kv_blocks(
                tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks, tables.full_kv_indices,
                BLOCK_SIZE=(self.block, self.block), mask_mod=mask_mod_for(tables, keep, self.mask_form),
                seq_lengths=(S, S))
        key = (problem.dtype, problem.head_dim, problem.q_heads, problem.kv_heads, plan.seq_len, problem.batch,
               block_mask is None, keep is None, device, self.key_order, self.mask_form)
        if self.compiled and key not in _compiled:
            with _lock:
                _compiled.add(key)
            log.info(f"fa4: first call of {str(problem.dtype)[6:]} head_dim={problem.head_dim} seq_len={plan.seq_len} "
                     f"{'dense' if block_mask is None else 'block-sparse'} in this process compiles the kernel "
                     "(several seconds; reused for every step of this shape)")
        return Fa4Prepared(plan, problem, block_mask, keep, layout)

    def run(self, prepared: Fa4Prepared, q, k, v, key_padding_mask=None):
        layout = prepared.layout
        if prepared.keep is not None:
            if key_padding_mask is None:
                raise ValueError("fa4: prepared for a padding mask but called without one")
            prepared.keep[:, layout.text_keys] = key_padding_mask
        keys = None if layout is None else layout.keys
        if keys is None or keys.order is None:
            return self._attend(prepared, q, k, v)
        refusal = "this key order moves every token" if keys.moved is None else _in_place_refusal(q, k, v)
        if refusal is not None:
            _log_copy_once(refusal)
            return self._attend(prepared, q, k.index_select(1, keys.order), v.index_select(1, keys.order))
        # the few moved tokens, in the caller's k and v and back: the kernel reads them in between (same stream)
        kernel_positions, tokens = keys.moved
        moved_k, moved_v = k.index_select(1, tokens), v.index_select(1, tokens)
        k.index_copy_(1, kernel_positions, moved_k)
        v.index_copy_(1, kernel_positions, moved_v)
        try:
            return self._attend(prepared, q, k, v)
        finally:
            k.index_copy_(1, tokens, moved_k)
            v.index_copy_(1, tokens, moved_v)

    def _attend(self, prepared: Fa4Prepared, q, k, v):
        attention = _flex(self.compiled)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kwargs = dict(block_mask=prepared.block_mask, scale=prepared.scale, enable_gqa=q.shape[2] != k.shape[2],
                      kernel_options=self.kernel_options)
        if not self.compiled:
            out = attention(*args, **kwargs)
        else:
            # every shape compiles its own kernel; past dynamo's default of 8 shapes it would silently run
            # FlexAttention's unfused fallback (a full score matrix: slow, or out of memory): raise instead
            with torch._dynamo.config.patch(recompile_limit=_SHAPES_PER_PROCESS, fail_on_recompile_limit_hit=True):
                try:
                    out = attention(*args, **kwargs)
                except Exception as error:
                    if "recompile" not in type(error).__name__.lower() and "RecompileLimit" not in str(error):
                        raise
                    raise DriverUnavailable(
                        f"fa4: more than {_SHAPES_PER_PROCESS} attention shapes were compiled in this process; "
                        "FlexAttention would fall back to its unfused path. Use fewer distinct shapes per process, "
                        "or another backend") from error
        return out.transpose(1, 2)


def _in_place_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the moved tokens cannot be moved in the caller's k and v and back (None: they can). Each case
    would give a wrong result or an error, so those calls copy every token instead."""
    if torch.compiler.is_compiling():
        return "inside torch.compile (the graph copies)"
    if any(t.requires_grad for t in (q, k, v)):  # autograd may save k and v: a write would break its backward
        return "q, k or v requires grad"
    if (k.is_inference() or v.is_inference()) and not torch.is_inference_mode_enabled():
        return "k or v was made in inference mode and cannot be written outside it"
    if any(torch._debug_has_internal_overlap(t) != 0 for t in (k, v)):
        return "k or v has elements that share memory (an expanded tensor)"
    storages = [t.untyped_storage().data_ptr() for t in (q, k, v)]
    if len(set(storages)) < 3:
        return "q, k and v share memory (views of one tensor, or the same tensor)"
    return None


_copy_reasons: set[str] = set()


def _log_copy_once(reason: str) -> None:
    if not torch.compiler.is_compiling() and reason not in _copy_reasons:
        _copy_reasons.add(reason)
        log.info(f"fa4: keys and values are copied into the kernel's order ({reason})")


@functools.cache
def _flex(compiled: bool) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: shapes and the mask's Python constants are fixed per geometry, which FA4's CuTe template needs
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def _cutlass_libraries() -> bool:
    """The CUDA build of the CuTe DSL runtime (nvidia-cutlass-dsl-libs-cu13, or -cu12): a shared library."""
    if not _importable("nvidia_cutlass_dsl"):
        return False
    roots = importlib.util.find_spec("nvidia_cutlass_dsl").submodule_search_locations or []
    return any(any(Path(root).glob("cu1*/lib/libcute_dsl_runtime*")) for root in roots)


def _has_flash_backend() -> bool:
    return _importable("torch._inductor.kernel.flex.flex_flash_attention")
