"""Ring steps of frame-sparse attention on torch, for any driver with attention that returns log-sum-exp.

:class:`lvsa.shards.RingStep` says which key tokens of a key shard the queries of a query shard attend, in
a global part (every query against the global frames' tokens in the key shard) and a window part (each
query frame against its non-global window frames' tokens there). Here that becomes index tensors, built
once per (plan, problem) and cached with the driver's prepared state (:mod:`lvsa.attention.drivers`), and
two kinds of calls of the driver's kernel: one over every query for the global part, and batched calls of
``[frames, window tokens]`` gathers for the window part (like :mod:`.split`). Window rows are grouped by
key count, so no call needs a mask; a frame cut by the query shard's edges repeats a query row whose output
is dropped. :func:`index_for` indexes one step (keys local
to its shard); :func:`index_for_shards` every step of a query shard over the shards end to end. The
partial results go into a :class:`LseAccumulator`, which merges them through their log-sum-exp."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lvsa.driver import GATHER_BUDGET_BYTES, AttentionProblem
from lvsa.plan import SparsePlan
from lvsa.shards import RingStep, Span

from .attention_ops import accumulation_dtype
from .split import Attend


@dataclass(frozen=True)
class WindowChunk:
    """A batch of query frames of the window part with the same number of keys, gathered together."""

    frames: int
    width: int  # keys per frame
    query_rows: torch.Tensor  # [frames * P] query-shard-local rows (a frame cut by the shard repeats a row)
    keys: torch.Tensor  # [frames * width] key positions
    take: torch.Tensor | None  # positions of the real rows in the [frames * P] output; None: all are real
    dest: torch.Tensor  # the query-shard-local rows those real rows belong to


@dataclass(frozen=True)
class RingStepIndex:
    global_keys: torch.Tensor | None  # key positions of the global frames' tokens
    chunks: tuple[WindowChunk, ...]


def _positions(spans: tuple[Span, ...] | list[Span]) -> torch.Tensor:
    return torch.cat([torch.arange(start, stop) for start, stop in spans])


def _shifted(spans: tuple[Span, ...], by: int) -> list[Span]:
    return [(start + by, stop + by) for start, stop in spans]


def index_for(step: RingStep, problem: AttentionProblem, budget_bytes: int = GATHER_BUDGET_BYTES,
              max_batch: int | None = None) -> RingStepIndex:
    """The index tensors of one ring step (keys local to its key shard)."""
    rows = [(row.queries, list(row.keys)) for row in step.window_rows]
    return _build(list(step.global_keys), rows, step.plan.patches_per_frame, problem, budget_bytes, max_batch)


def index_for_shards(plan: SparsePlan, shards: int, query_shard: int, problem: AttentionProblem,
                     budget_bytes: int = GATHER_BUDGET_BYTES, max_batch: int | None = None) -> RingStepIndex:
    """Every ring step of a query shard in one index, over the key shards laid end to end (the all-gathered
    sequence): the same attended pairs as the steps one by one, with each frame's whole window in one
    gather, so the calls are as large as on one device and need no masks."""
    steps = [RingStep(plan, shards, query_shard, j) for j in range(shards)]
    size = plan.video_tokens // shards
    global_spans = [span for j, step in enumerate(steps) for span in _shifted(step.global_keys, j * size)]
    rows: dict[int, tuple[Span, list[Span]]] = {}
    for j, step in enumerate(steps):
        for row in step.window_rows:
            rows.setdefault(row.frame, (row.queries, []))[1].extend(_shifted(row.keys, j * size))
    return _build(global_spans, [rows[f] for f in sorted(rows)], plan.patches_per_frame, problem, budget_bytes,
                  max_batch)


def _build(global_spans: list[Span], rows: list[tuple[Span, list[Span]]], P: int, problem: AttentionProblem,
           budget_bytes: int, max_batch: int | None) -> RingStepIndex:
    """Window rows are grouped by their key count, so that a chunk pads (and masks) keys only when its rows
    differ; a frame cut by the query shard's edges repeats a query row, whose output is dropped."""
    device = problem.device
    global_keys = _positions(global_spans).to(device) if global_spans else None
    item = torch.empty((), dtype=problem.dtype).element_size()
    chunks = []
    by_width: dict[int, list[tuple[Span, list[Span]]]] = {}
    for row in rows:
        by_width.setdefault(sum(stop - start for start, stop in row[1]), []).append(row)
    for width in sorted(by_width):
        group = by_width[width]
        per_frame = 2 * problem.batch * width * problem.q_heads * problem.head_dim * item
        per_frame += 3 * problem.batch * P * problem.q_heads * problem.head_dim * 4  # float32 merge temporaries
        per_chunk = max(1, budget_bytes // max(per_frame, 1))
        if max_batch is not None:
            per_chunk = max(1, min(per_chunk, max_batch // problem.batch))
        for c0 in range(0, len(group), per_chunk):
            chunks.append(_chunk(group[c0 : c0 + per_chunk], P, width, device))
    return RingStepIndex(global_keys, tuple(chunks))


def _chunk(part: list[tuple[Span, list[Span]]], P: int, width: int, device: torch.device | str) -> WindowChunk:
    query_rows, keys, take, dest = [], [], [], []
    for n, (queries, key_spans) in enumerate(part):
        real = torch.arange(queries[0], queries[1])
        query_rows.append(torch.cat([real, real[-1:].expand(P - len(real))]))
        take.append(n * P + torch.arange(len(real)))
        dest.append(real)
        keys.append(_positions(key_spans))
    take_all = torch.cat(take)
    return WindowChunk(
        frames=len(part),
        width=width,
        query_rows=torch.cat(query_rows).to(device),
        keys=torch.cat(keys).to(device),
        take=None if len(take_all) == len(part) * P else take_all.to(device),
        dest=torch.cat(dest).to(device),
    )


class LseAccumulator:
    """The running attention of a set of queries over the key sets seen so far: output (float32, or float64
    for float64 inputs) and log-sum-exp; :meth:`add` merges one more partial over disjoint keys."""

    def __init__(self, like: torch.Tensor) -> None:
        B, S, H, D = like.shape
        dtype = accumulation_dtype(like)
        self.out = torch.zeros(B, S, H, D, dtype=dtype, device=like.device)
        self.lse = torch.full((B, H, S), float("-inf"), dtype=dtype, device=like.device)
        self.empty = True

    def add(self, out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Merge a partial ``out [B, n, H, D]``, ``lse [B, H, n]`` for ``rows`` (all rows when None)."""
        if self.empty and rows is None:  # the first partial over every row is the running result as it is
            self.out, self.lse, self.empty = out.to(self.out.dtype), lse.to(self.lse.dtype), False
            return
        self.empty = False
        old_out = self.out if rows is None else self.out.index_select(1, rows)
        old_lse = self.lse if rows is None else self.lse.index_select(2, rows)
        lse = lse.to(self.lse.dtype)
        new_lse = torch.logaddexp(old_lse, lse)
        # rows that saw no key in either part stay empty (-inf) instead of becoming NaN
        pivot = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
        w_old = torch.exp(old_lse - pivot).transpose(1, 2).unsqueeze(-1)
        w_new = torch.exp(lse - pivot).transpose(1, 2).unsqueeze(-1)
        merged = old_out * w_old + out.to(self.out.dtype) * w_new
        if rows is None:
            self.out, self.lse = merged, new_lse
        else:
            self.out.index_copy_(1, rows, merged)
            self.lse.index_copy_(2, rows, new_lse)


def run_step(index: RingStepIndex, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             attend: Attend, into: LseAccumulator) -> None:
    """The video queries ``q`` ``[B, L, Hq, D]`` of a query shard against the keys ``k``/``v`` ``[B, *, Hkv, D]``
    that ``index`` addresses (one key shard, or every shard end to end), merged into ``into``."""
    B, _, Hq, D = q.shape
    if index.global_keys is not None:
        into.add(*attend(q, k.index_select(1, index.global_keys), v.index_select(1, index.global_keys), None, scale))
    for chunk in index.chunks:
        n, P = chunk.frames, chunk.query_rows.numel() // chunk.frames
        qc = q.index_select(1, chunk.query_rows).view(B * n, P, Hq, D)
        kc = k.index_select(1, chunk.keys).view(B * n, chunk.width, k.shape[2], D)
        vc = v.index_select(1, chunk.keys).view(B * n, chunk.width, v.shape[2], D)
        out, lse = attend(qc, kc, vc, None, scale)
        del qc, kc, vc
        out = out.reshape(B, n * P, Hq, D)
        lse = lse.reshape(B, n, Hq, P).transpose(1, 2).reshape(B, Hq, n * P)
        if chunk.take is not None:
            out, lse = out.index_select(1, chunk.take), lse.index_select(2, chunk.take)
        into.add(out, lse, chunk.dest)
