"""How a plan meets the sequence shards of ring attention (pattern.md §7). Pure Python, no device.

Under ring attention the video sequence is cut into ``R`` equal token shards (frames may straddle a cut).
In a ring step a rank's query shard meets one key shard; :class:`RingStep` says exactly which (query
token, key token) pairs of that pair of shards the plan attends, as token ranges local to each shard, in
the two parts every driver of the split shape computes (pattern.md §6):

- the **global part**: the global frames' tokens inside the key shard, attended by every query of the
  query shard;
- the **window part**: per query frame (its tokens inside the query shard), the tokens of its non-global
  window frames inside the key shard.

A step with neither part shares no attended frame pair: ring attention skips its compute. This module is
the one owner of that rule; the runtime counts what it skipped against it and the tests check it against
the float64 reference's token mask."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from . import caches
from .errors import GeometryError
from .plan import SparsePlan

#: a half-open token range ``(start, stop)``
Span = tuple[int, int]


def shard_span(video_tokens: int, shards: int, index: int) -> Span:
    """The video tokens of shard ``index`` of ``shards`` equal shards (video-token coordinates)."""
    if shards < 1 or video_tokens % shards:
        raise GeometryError(f"{video_tokens} video tokens do not split into {shards} equal ring shards")
    if not 0 <= index < shards:
        raise GeometryError(f"ring shard {index} outside 0..{shards - 1}")
    size = video_tokens // shards
    return index * size, (index + 1) * size


def _clip(span: Span, within: Span) -> Span | None:
    """``span`` inside ``within``, local to ``within``'s start; ``None`` when they do not overlap."""
    start, stop = max(span[0], within[0]), min(span[1], within[1])
    return (start - within[0], stop - within[0]) if start < stop else None


def _frame_runs(frames: list[int]) -> list[tuple[int, int]]:
    """Sorted frames as runs of consecutive frames ``(first, last + 1)``."""
    runs: list[tuple[int, int]] = []
    for f in frames:
        if runs and runs[-1][1] == f:
            runs[-1] = (runs[-1][0], f + 1)
        else:
            runs.append((f, f + 1))
    return runs


@dataclass(frozen=True)
class WindowRow:
    """One query frame's window part in a ring step: its queries and the keys of its non-global window
    frames, both as ranges local to their shards."""

    frame: int
    queries: Span
    keys: tuple[Span, ...]

    @property
    def key_count(self) -> int:
        return sum(stop - start for start, stop in self.keys)


@dataclass(frozen=True)
class RingStep:
    """Query shard ``query_shard`` against key shard ``key_shard`` of a plan cut into ``shards`` shards.
    Hashable: drivers' index tensors are cached by it (once per plan and step of the ring, not per layer)."""

    plan: SparsePlan
    shards: int
    query_shard: int
    key_shard: int

    @cached_property
    def query_span(self) -> Span:
        return shard_span(self.plan.video_tokens, self.shards, self.query_shard)

    @cached_property
    def key_span(self) -> Span:
        return shard_span(self.plan.video_tokens, self.shards, self.key_shard)

    @property
    def shard_tokens(self) -> int:
        return self.plan.video_tokens // self.shards

    def _frames(self, span: Span) -> range:
        P = self.plan.patches_per_frame
        return range(span[0] // P, (span[1] - 1) // P + 1)

    def _tokens(self, runs: list[tuple[int, int]], within: Span) -> tuple[Span, ...]:
        P = self.plan.patches_per_frame
        clipped = (_clip((first * P, end * P), within) for first, end in runs)
        return tuple(span for span in clipped if span is not None)

    @cached_property
    def global_keys(self) -> tuple[Span, ...]:
        """Key-shard-local token ranges of the global frames: every query of the shard attends them."""
        key_frames = self._frames(self.key_span)
        inside = [g for g in self.plan.globals if key_frames.start <= g < key_frames.stop]
        return self._tokens(_frame_runs(inside), self.key_span)

    @cached_property
    def window_rows(self) -> tuple[WindowRow, ...]:
        """The query frames of the shard whose non-global window frames reach into the key shard."""
        plan, P = self.plan, self.plan.patches_per_frame
        key_frames = self._frames(self.key_span)
        is_global = set(plan.globals)
        rows = []
        for f in self._frames(self.query_span):
            lo, hi = plan.windows[f]
            frames = [g for g in range(max(lo, key_frames.start), min(hi + 1, key_frames.stop)) if g not in is_global]
            keys = self._tokens(_frame_runs(frames), self.key_span)
            if keys:
                queries = _clip((f * P, (f + 1) * P), self.query_span)
                assert queries is not None  # f overlaps the query shard by construction
                rows.append(WindowRow(f, queries, keys))
        return tuple(rows)

    @property
    def attends(self) -> bool:
        """Whether any video query of the query shard attends any video key of the key shard."""
        return bool(self.global_keys or self.window_rows)

    @property
    def is_local(self) -> bool:
        """The step in which a rank meets its own shard: it also carries the text keys, if any."""
        return self.query_shard == self.key_shard


@lru_cache(maxsize=256)
def skipped_key_shards(plan: SparsePlan, shards: int, query_shard: int) -> tuple[int, ...]:
    """The key shards whose ring step the query shard skips: they share no attended frame pair with it.
    Cached per plan: layer calls ask it, and working it out walks the shard's frames in Python."""
    return tuple(j for j in range(shards) if not RingStep(plan, shards, query_shard, j).attends)


caches.register("ring-shards", skipped_key_shards.cache_clear)
