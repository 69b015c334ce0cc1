"""The plan as FlexAttention tiles: a ``BlockMask`` over ``block x block`` tiles of the kernel's sequence
(video and text), for the fa4 driver and the benchmarks that time FA4's kernel on the driver's tiles.

Tokens belong to *groups*: one per latent frame, and one for the text; a ``[G, G]`` boolean table says
which query group attends which key group (the plan's frames; text queries attend everything, every query
attends the text). A tile is

- *full* when every (query, key) pair in it is attended: the kernel skips the mask there;
- *partial* when only some are (a tile holds parts of several groups, or padded text keys): the kernel
  evaluates ``mask_mod`` at each of its positions, so ``mask_mod`` compares a key's group with the query's
  window bounds (:func:`interval_mask`, :func:`mask_mod_for`) rather than reading the group table;
- skipped otherwise.

**Reordered keys.** A frame rarely fills whole tiles (Wan: 1560 tokens = 12 x 128 + 24), so in token order
about one visited tile in ten is partial. The keys and values can be reordered so that every tile holds one
frame's tokens, or frames' short remainders (the global frames' first), or text; then under 2% of the visited
tiles are partial. :func:`in_place_side` reaches that kind of order by moving few tokens (the driver moves
them in the caller's k and v and back); :func:`aligned_side` moves every token. The queries stay in token
order. The tiles are classified on the device in a few vectorised operations (group counts per tile, times
the group table), once per plan. The measurements behind these choices are in docs/performance.md."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from lvsa.plan import SparsePlan

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


def key_order_side(key_order: str) -> Callable[[SparsePlan, int, torch.device | str], Side | None]:
    """The function that builds the keys' side in ``key_order`` (one of :data:`KEY_ORDERS`)."""
    if key_order not in _KEY_SIDES:
        raise ValueError(f"fa4: key_order {key_order!r} is not one of {', '.join(KEY_ORDERS)}")
    return _KEY_SIDES[key_order]


def tile_layout(plan: SparsePlan, block: int, device: torch.device | str, key_order: str = "in-place") -> TileLayout:
    """Queries in token order; keys and values in ``key_order`` where it reorders them (see
    :func:`in_place_side`, :func:`aligned_side`; "token": none). Reordering the queries as well was measured
    slower: it copies q and the output too, and each remainder query tile holds several frames, so it visits
    the union of their keys through the mask."""
    tokens = token_side(plan, device)
    keys = key_order_side(key_order)(plan, block, device)
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


def check_mask_form(form: str) -> str:
    """``form`` when it is one of :data:`MASK_FORMS`, else a ValueError naming them."""
    if form not in MASK_FORMS:
        raise ValueError(f"fa4: mask_form {form!r} is not one of {', '.join(MASK_FORMS)}")
    return form


def mask_mod_for(tables: BlockTables, keep: torch.Tensor | None, form: str = "interval") -> Callable[..., Any]:
    """``mask_mod(b, h, q, k)`` over kernel positions. FA4 evaluates it at every position of a partial tile,
    so its cost per position counts. The "interval" form makes three independent reads, each of ``q`` or ``k``
    alone, and compares; the "table" form computes both slots (a read of the key tile's code, divisions) and
    then reads the table at an address made of both (the two are compared in docs/performance.md). The
    interval form needs :attr:`BlockTables.intervals` (else the table). The tensors are the compiled kernel's
    captured buffers, so a rotated plan changes data, not the kernel; ``keep`` covers whole tiles."""
    intervals = tables.intervals if check_mask_form(form) == "interval" else None
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


def to_tiles(values: torch.Tensor, block: int) -> torch.Tensor:
    """``values`` padded with zeros (a dropped key) to whole tiles along the last dimension: the kernel calls
    ``mask_mod`` on every position of a tile, including those past the sequence, before it masks them, and an
    index past a captured tensor's end reads out of bounds."""
    return torch.nn.functional.pad(values, (0, -values.shape[-1] % block))



def block_mask(plan: SparsePlan, tables: BlockTables, keep: torch.Tensor | None, form: str = "interval") -> Any:
    """FlexAttention's ``BlockMask`` of ``tables`` (from :func:`block_tables`), with ``mask_mod`` in ``form``
    and the padding ``keep`` mask (over kernel key positions, whole tiles) when the text is padded."""
    from torch.nn.attention.flex_attention import BlockMask

    S = plan.seq_len
    return BlockMask.from_kv_blocks(
        tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks, tables.full_kv_indices,
        BLOCK_SIZE=(tables.block, tables.block), mask_mod=mask_mod_for(tables, keep, form), seq_lengths=(S, S))


@functools.cache
def flex_attention(compiled: bool) -> Callable[..., torch.Tensor]:
    """torch's FlexAttention, compiled once per process when ``compiled`` (every caller shares that function,
    so a shape compiles once), else the eager reference path."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    # dynamic=False: shapes and the mask's Python constants are fixed per geometry, which FA4's CuTe template needs
    return torch.compile(eager, dynamic=False) if compiled else eager
