"""What a layer call is executed with: the frozen per-forward :class:`AttentionContext`, and the per-pipeline
pieces it refers to (:class:`PlanCache`, :class:`FallbackPolicy`, :class:`ExecutionStats`).

A host builds one context per transformer forward (the geometry, the denoising step, the context-parallel
layout, the driver request, the policy) and hands it to :func:`lvsa.attention.execute` with every layer
call; nothing in here reaches back into the host. The plan of a step is built on the first layer that asks
and shared by every layer of every forward of that step (:class:`PlanCache`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import log
from ..errors import GeometryError
from ..geometry import LatentGrid, TextPosition
from ..plan import PatternKnobs, SparsePlan, build_plan
from .drivers import DriverChoice
from .layout import ContextParallel

_PLANS_KEPT = 64  # plans of past steps are never asked for again: the cache is emptied past this many


@dataclass
class ExecutionStats:
    steps: int = 0  # denoising steps seen (forwards at a new timestep)
    plan_builds: int = 0
    sparse_calls: int = 0  # layer calls that ran through an lvsa driver (dense ones of the next line included)
    dense_calls: int = 0  # of those, calls run dense by the dense warm-up or the dense layers (lvsa.dense)
    #: per denoising step: [calls run dense by the warm-up or the dense layers, calls run under the plan]
    calls_by_step: dict[int, list[int]] = field(default_factory=dict)
    fallback_calls: int = 0  # layer calls handed back to the model's own attention
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    ulysses_degree: int = 1  # the Ulysses degree of the last forward
    ring_degree: int = 1  # the ring degree of the last forward
    ring_steps: int = 0  # ring steps of this rank's layer calls (ring_degree per call)
    ring_steps_skipped: int = 0  # of those, skipped: the shards shared no attended frame pair
    #: the key shards this rank skipped in its last layer call
    last_skipped_key_shards: tuple[int, ...] = ()


class FallbackPolicy:
    """The one rule for every call lvsa cannot run as asked (a layer it cannot plan, layers whose processor
    was replaced, ...): an error under ``fallback=error`` or when ``strict``; else one loud ``[LVSA-FALLBACK]``
    line per kind of problem, and the calls counted."""

    def __init__(self, mode: Literal["error", "warn"], stats: ExecutionStats) -> None:
        self.mode = mode
        self.stats = stats
        self._warned: set[tuple[str, Any]] = set()
        self._lock = threading.Lock()

    def fall_back(self, origin: str, reason: str, detail: str, fix: str, *, error: type[Exception] = GeometryError,
                  strict: bool = False, count: int = 1, once: Any = None, **fields: Any) -> None:
        """Raise ``error`` (``[LVSA-FALLBACK] origin=.. reason=..: detail. fix``), or log the line once per
        ``(reason, once)`` and count ``count`` calls. ``fields`` go into the line (``seq_len`` into both)."""
        if self.mode == "error" or strict:
            where = f" seq_len={fields['seq_len']}" if "seq_len" in fields else ""
            raise error(f"[LVSA-FALLBACK] origin={origin} reason={reason}{where}: {detail}. {fix}")
        with self._lock:
            self.stats.fallback_calls += count
            self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + count
            first = (reason, once) not in self._warned
            self._warned.add((reason, once))
        if first:
            log.fallback(origin, reason, **fields, detail=detail)


class PlanCache:
    """The plans of one installation, per (frames, tokens per frame, text, step): built once, shared by every
    layer and forward that asks for the same."""

    def __init__(self, stats: ExecutionStats) -> None:
        self.stats = stats
        self.last_plan: SparsePlan | None = None
        self._plans: dict[tuple[Any, ...], SparsePlan] = {}
        self._lock = threading.Lock()

    def get(self, latent_frames: int, patches_per_frame: int, knobs: PatternKnobs, text_tokens: int,
            text_position: TextPosition, step: int, dense: bool = False) -> SparsePlan:
        step = 0 if dense else step
        key = (latent_frames, patches_per_frame, text_tokens, text_position, step, dense)
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is None:
                    plan = build_plan(latent_frames, patches_per_frame, knobs, text_tokens=text_tokens,
                                      text_position=text_position, step=step, dense=dense)
                    if len(self._plans) > _PLANS_KEPT:
                        self._plans.clear()
                    self._plans[key] = plan
                    self.stats.plan_builds += 1
                    self.last_plan = plan
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


_GEOMETRY_FIX = ("Check the geometry overrides (LVSA_PATCHES_PER_FRAME, LVSA_VIDEO_HEIGHT/WIDTH, "
                 "LVSA_VAE_SPATIAL_FACTOR, LVSA_PATCH_SIZE), or set LVSA_FALLBACK=warn to run such layers "
                 "with the model's dense attention")


@dataclass(frozen=True)
class AttentionContext:
    """Everything a layer call of one forward is executed with. ``grid`` is None before the host saw a
    forward (a layer called outside the transformer); ``patches_per_frame`` is the tokens per frame to plan
    for (0 when the settings' geometry override cannot be resolved: every layer then reports the mismatch)."""

    grid: LatentGrid | None
    patches_per_frame: int
    #: the step the plan is built for (0 for a plan that does not rotate)
    step: int
    knobs: PatternKnobs
    text_position: TextPosition
    parallel: ContextParallel | None
    driver: DriverChoice
    fallback: FallbackPolicy
    plans: PlanCache
    stats: ExecutionStats
    #: what the model is called in messages (the adapter's name)
    model: str
    #: the denoising step of the forward (``step`` is 0 for a plan that does not rotate)
    denoising_step: int = 0
    #: every layer call of this forward runs dense (a dense warm-up step, lvsa.dense)
    dense_step: bool = False
    #: the layers that run dense in every step (qualified names, lvsa.dense)
    dense_layers: frozenset[str] = frozenset()

    def video_tokens(self, local_tokens: int) -> int:
        """The whole video's token count from a layer's (possibly sequence-sharded) share of it."""
        return local_tokens * (self.parallel.degree if self.parallel else 1)

    def plan(self, origin: str, seq_len: int, text_tokens: int = 0) -> SparsePlan | None:
        """This step's plan for a ``seq_len`` sequence with ``text_tokens`` of text, or ``None`` after a loud
        fallback (the policy's)."""
        grid = self.grid
        if grid is None:
            self.unsupported(origin, "no_t_lat", seq_len, "the transformer's forward hook did not run "
                             "(was the layer called outside the transformer?)")
            return None
        ppf = self.patches_per_frame
        if grid.latent_frames * ppf + text_tokens != seq_len:
            self.unsupported(
                origin, "geometry_detect", seq_len,
                f"{grid.latent_frames} latent frames x {ppf} tokens + {text_tokens} text tokens != {seq_len}",
                known_ppf=sorted({ppf, grid.patches_per_frame}),
            )
            return None
        dense = self.dense_step or origin in self.dense_layers
        plan = self.plans.get(grid.latent_frames, ppf, self.knobs, text_tokens, self.text_position, self.step, dense)
        stats = self.stats
        stats.sparse_calls += 1
        stats.dense_calls += dense
        counts = stats.calls_by_step.setdefault(self.denoising_step, [0, 0])
        counts[0 if dense else 1] += 1
        return plan

    def unsupported(self, origin: str, reason: str, seq_len: int, detail: str, **fields: Any) -> None:
        """A layer lvsa cannot plan: the policy's error, or its loud line and the model's own attention. Under
        context parallelism always an error: the model's own attention would see lvsa's sharding."""
        if "known_ppf" not in fields and self.grid is not None:
            fields["known_ppf"] = [self.grid.patches_per_frame]
        self.fallback.fall_back(origin, reason, detail, _GEOMETRY_FIX, strict=self.parallel is not None,
                                once=seq_len, seq_len=seq_len, **fields)
