"""What the lvsa layers of one pipeline share: the denoising step, the step's plans, and the fallbacks.

A forward pre-hook on each transformer tells the runtime the latent grid and the timestep of the call.
Three small pieces, each with one job: the step (:class:`.steps.StepTracker`: the pipeline's schedule
where lvsa was applied to a pipeline, else the timestep), the step's plan (:meth:`LVSARuntime.plan_for`:
built once, on the first layer that asks, then shared by every layer of every forward of that step), and
the sequence-parallel call (:func:`lvsa.ulysses.to_heads` / :func:`lvsa.ulysses.to_sequence` around the
driver, and :func:`lvsa.ring.ring_attention` in place of it under ring attention). The fallback policy
(error, or a loud counted line) is :meth:`LVSARuntime.unsupported`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .. import log
from ..backends.attention_ops import dense_attention, key_mask_with_text
from ..dispatch import sparse_attention
from ..errors import ConfigError, GeometryError
from ..geometry import ModelFamily, pick_factor, planned_patches_per_frame
from ..plan import PatternKnobs, SparsePlan, build_plan, resolve_knobs, rotates
from ..riflex import TemporalRope, rewrite_tables
from ..ring import ContextParallel, RingResult, ring_attention
from ..ulysses import QKV, UlyssesGroup, to_heads, to_sequence
from . import ops
from .base import LatentGrid
from .ops import DeferredPlan
from .steps import ScheduleSteps, StepTracker

if TYPE_CHECKING:
    from ..settings import LVSASettings


@dataclass
class RuntimeStats:
    steps: int = 0  # denoising steps seen (forwards at a new timestep)
    plan_builds: int = 0
    sparse_calls: int = 0  # layer calls that ran through an lvsa driver
    fallback_calls: int = 0  # layer calls handed back to the model's own attention
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    ulysses_degree: int = 1  # the Ulysses degree of the last forward
    ring_degree: int = 1  # the ring degree of the last forward
    ring_steps: int = 0  # ring steps of this rank's layer calls (ring_degree per call)
    ring_steps_skipped: int = 0  # of those, skipped: the shards shared no attended frame pair
    #: the key shards this rank skipped in its last layer call
    last_skipped_key_shards: tuple[int, ...] = ()


class LVSARuntime:
    def __init__(self, settings: LVSASettings, family: ModelFamily, vae_temporal_factor: int,
                 adapter_name: str) -> None:
        self.settings = settings
        self.family = family
        self.adapter_name = adapter_name
        self.vae_temporal_factor = pick_factor(settings, "vae_temporal_factor", vae_temporal_factor)
        self.knobs: PatternKnobs = resolve_knobs(settings, family, self.vae_temporal_factor)
        self.stats = RuntimeStats()
        self.grid: LatentGrid | None = None
        self.parallel: ContextParallel | None = None  # set while the transformer runs context-parallel
        self.steps = StepTracker()
        self.last_plan: SparsePlan | None = None
        self._planned_ppf = 0
        self._plan_step = 0
        self._plans: dict[tuple[Any, ...], SparsePlan] = {}
        self._warned: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        # what torch.compile'd transformers reach through the custom ops (see .ops)
        self.key = ops.register(self)
        with torch.inference_mode(False):  # mutated inside inference_mode and outside it alike
            self.ticket = torch.zeros(1, dtype=torch.int64)
        #: per transformer (in the handle's order): the forward pre-hook's work, called by lvsa::forward_start
        self.forward_callbacks: list[Callable[[torch.Tensor, Any], None]] = []
        self.layer_names: list[str] = []  # indexed by the layers' keys

    def layer_key(self, name: str) -> torch.Tensor:
        """A one-element tensor naming layer ``name`` for the ``lvsa::attention`` op."""
        self.layer_names.append(name)
        with torch.inference_mode(False):
            return torch.tensor([len(self.layer_names) - 1], dtype=torch.int64)

    # -- per forward -------------------------------------------------------------------------------
    def begin_forward(self, grid: LatentGrid, timestep: Any, parallel: ContextParallel | None = None) -> None:
        if parallel is not None:
            parallel.check_tokens(grid.latent_frames * grid.patches_per_frame, grid.latent_frames,
                                  grid.patches_per_frame)
        self.parallel = parallel
        self.stats.ulysses_degree = parallel.ulysses.degree if parallel and parallel.ulysses else 1
        self.stats.ring_degree = parallel.ring.degree if parallel and parallel.ring else 1
        step = self.steps.observe(timestep)
        with self._lock:
            self.stats.steps = self.steps.steps_seen
            self.grid = grid
            # what every layer of this forward asks: worked out once here, not per layer call
            self._planned_ppf = self._planned_patches_per_frame(grid)
            self._plan_step = step if rotates(grid.latent_frames, self.knobs) else 0

    @property
    def ulysses(self) -> UlyssesGroup | None:
        """The Ulysses group of the current forward, if any."""
        return self.parallel.ulysses if self.parallel else None

    @property
    def step(self) -> int:
        """The denoising step of the current forward."""
        return self.steps.step

    @property
    def schedule(self) -> ScheduleSteps:
        """The schedules of the pipelines lvsa was applied to (the exact step)."""
        return self.steps.schedule

    def set_step(self, step: int) -> None:
        """For custom denoising loops: the step that the next forwards belong to."""
        self.steps.set_step(step)

    def reset(self) -> None:
        self.steps.reset()
        with self._lock:
            self.grid = None
            self._plans.clear()

    # -- per layer ---------------------------------------------------------------------------------
    def plan_for(self, origin: str, seq_len: int, text_tokens: int = 0,
                 text_position: Literal["before", "after"] = "after") -> SparsePlan | None:
        """The plan of this step for a ``seq_len`` sequence, or ``None`` after a loud fallback."""
        grid = self.grid
        if grid is None:
            self.unsupported(origin, "no_t_lat", seq_len, "the transformer's forward hook did not run "
                             "(was the layer called outside the transformer?)")
            return None
        ppf = self._planned_ppf
        if grid.latent_frames * ppf + text_tokens != seq_len:
            known = sorted({ppf, grid.patches_per_frame})
            self.unsupported(
                origin, "geometry_detect", seq_len,
                f"{grid.latent_frames} latent frames x {ppf} tokens + {text_tokens} text tokens != {seq_len}",
                known_ppf=known,
            )
            return None
        step = self._plan_step
        key = (grid.latent_frames, ppf, text_tokens, text_position, step)
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(key)
                if plan is None:
                    plan = build_plan(grid.latent_frames, ppf, self.knobs, text_tokens=text_tokens,
                                      text_position=text_position, step=step)
                    if len(self._plans) > 64:  # plans of past steps are never asked for again
                        self._plans.clear()
                    self._plans[key] = plan
                    self.stats.plan_builds += 1
                    self.last_plan = plan
        self.stats.sparse_calls += 1
        return plan

    def video_tokens(self, local_tokens: int) -> int:
        """The whole video's token count from a layer's (possibly sequence-sharded) share of it."""
        return local_tokens * (self.parallel.degree if self.parallel else 1)

    def attention(
        self,
        video: QKV,
        text: QKV | None,
        plan: SparsePlan | DeferredPlan,
        key_padding_mask: torch.Tensor | None = None,
        *,
        layer_key: torch.Tensor | None = None,
        text_position: Literal["before", "after"] = "after",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the video (and text) ``[B, S, H, D]`` queries, keys and values under ``plan``; returns
        the video and text outputs. Under Ulysses the video arrives and leaves as sequence shards and the
        text whole; in between every rank runs the whole sequence for its heads. A :data:`DEFERRED` plan
        (under torch.compile) is planned and run inside the ``lvsa::attention`` op."""
        if isinstance(plan, DeferredPlan):
            text_q, text_k, text_v = text if text is not None else (None, None, None)
            if layer_key is None:
                raise ValueError("a deferred plan needs the layer's key (LVSAProcessor.layer_key)")
            video_out, text_out = ops.attention(self.ticket, layer_key, *video, text_q, text_k, text_v,
                                                key_padding_mask, self.key, text_position)
            return video_out, (text_out if text is not None else None)
        return self._attend(video, text, plan, key_padding_mask)

    def plan_and_attend(
        self,
        origin: str,
        video: QKV,
        text: QKV | None,
        key_padding_mask: torch.Tensor | None,
        text_position: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``lvsa::attention`` op's work: this step's plan and the attention under it; a layer that cannot
        be planned (after the loud fallback of :meth:`plan_for`) gets dense attention over the same tensors."""
        if text_position not in ("before", "after"):
            raise ValueError(f"text_position={text_position!r}: before or after")
        text_tokens = 0 if text is None else text[0].shape[1]
        seq_len = self.video_tokens(video[0].shape[1]) + text_tokens
        plan = self.plan_for(origin, seq_len, text_tokens, text_position)  # type: ignore[arg-type]
        video_out, text_out = self._attend(video, text, plan, key_padding_mask, text_position)
        # an op's outputs have the strides its fake says (contiguous) and never share storage
        if text_out is None:
            return video_out.contiguous(), None
        return video_out.clone(memory_format=torch.contiguous_format), text_out.clone(
            memory_format=torch.contiguous_format)

    def _attend(
        self,
        video: QKV,
        text: QKV | None,
        plan: SparsePlan | None,
        key_padding_mask: torch.Tensor | None,
        text_position: str = "after",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``plan=None``: dense attention over the joined sequence (a fallback inside the op)."""
        ulysses = self.ulysses
        if ulysses is not None:
            ulysses.check_heads(video[0].shape[2], self.adapter_name)
            video, text = to_heads(video, text, ulysses)
        ring = self.parallel.ring if self.parallel else None
        if ring is not None:
            if plan is None:  # unsupported() raises under context parallelism: no plan never reaches here
                raise GeometryError("ring attention needs a plan")
            result = ring_attention(video, text, plan, key_padding_mask, ring, self.settings)
            self._count_ring_steps(result)
            video_out, text_out = result.video, result.text
            if ulysses is not None:
                video_out, text_out = to_sequence(video_out, text_out, ulysses)
            return video_out, text_out
        position = plan.text_position if plan is not None else text_position
        video_len = video[0].shape[1]
        if text is None:
            q, k, v = video
        else:
            first, second = (video, text) if position == "after" else (text, video)
            q, k, v = (torch.cat([a, b], dim=1) for a, b in zip(first, second, strict=True))
        if plan is not None:
            out = sparse_attention(q, k, v, plan, key_padding_mask=key_padding_mask, settings=self.settings)
        else:
            key_mask = key_mask_with_text(key_padding_mask, q.shape[1], video_len if position == "after" else 0,
                                          q.shape[0], q.device)
            out = dense_attention(q, k, v, key_mask)
        text_out = None
        if text is None:
            video_out = out
        elif position == "after":
            video_out, text_out = out[:, :video_len], out[:, video_len:]
        else:
            text_out, video_out = out[:, :-video_len], out[:, -video_len:]
        if ulysses is not None:
            video_out, text_out = to_sequence(video_out, text_out, ulysses)
        return video_out, text_out

    def unsupported(self, origin: str, reason: str, seq_len: int, detail: str, **fields: Any) -> None:
        """A layer lvsa cannot plan: an error under ``fallback=error``, else one loud line per kind of
        problem and the model's own attention."""
        if "known_ppf" not in fields and self.grid is not None:
            fields["known_ppf"] = [self.grid.patches_per_frame]
        # under context parallelism the model's own attention would see lvsa's sharding: never fall back there
        if self.settings.fallback == "error" or self.parallel is not None:
            raise GeometryError(
                f"[LVSA-FALLBACK] origin={origin} reason={reason} seq_len={seq_len}: {detail}. "
                "Check the geometry overrides (LVSA_PATCHES_PER_FRAME, LVSA_VIDEO_HEIGHT/WIDTH, "
                "LVSA_VAE_SPATIAL_FACTOR, LVSA_PATCH_SIZE), or set LVSA_FALLBACK=warn to run such layers "
                "with the model's dense attention"
            )
        with self._lock:
            self.stats.fallback_calls += 1
            self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + 1
            first = (reason, seq_len) not in self._warned
            self._warned.add((reason, seq_len))
        if first:
            log.fallback(origin, reason, seq_len=seq_len, **fields, detail=detail)

    def processors_replaced(self, layers: list[str]) -> None:
        """Some of lvsa's layers were given another processor after apply: they no longer run through lvsa.
        An error under ``fallback=error``; else a loud line, once per set of layers, and counted."""
        detail = (f"{len(layers)} layers no longer run lvsa's processor (set_attn_processor or similar after "
                  f"lvsa.apply): {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}")
        if self.settings.fallback == "error":
            raise ConfigError(
                f"[LVSA-FALLBACK] origin={layers[0]} reason=processor_replaced: {detail}. Call lvsa.apply again "
                "after changing processors, or lvsa.remove first; LVSA_FALLBACK=warn runs them as they are")
        with self._lock:
            self.stats.fallback_calls += len(layers)
            reasons = self.stats.fallback_reasons
            reasons["processor_replaced"] = reasons.get("processor_replaced", 0) + len(layers)
            first = ("processor_replaced", len(layers)) not in self._warned
            self._warned.add(("processor_replaced", len(layers)))
        if first:
            log.fallback(layers[0], "processor_replaced", layers=len(layers), detail=detail)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a model with lvsa installed cannot be copied or pickled (its processors and hooks share one "
            "runtime, which a copy would split): lvsa.remove(model), copy it, then lvsa.apply to each copy")

    # -- RIFLEx ------------------------------------------------------------------------------------
    def riflex_factor(self, latent_frames: int) -> float:
        if self.settings.riflex_s is not None:
            return self.settings.riflex_s
        return max(1.0, latent_frames / self.knobs.reference_frames)

    def riflex_tables(self, cos: torch.Tensor, sin: torch.Tensor, rope: TemporalRope) -> tuple[Any, Any]:
        grid = self.grid
        if grid is None:
            raise GeometryError("RIFLEx: the rotary tables were built before the transformer's forward hook ran")
        s = self.riflex_factor(grid.latent_frames)
        total = grid.latent_frames * grid.patches_per_frame
        rows = cos.numel() // cos.shape[-1]
        offset = 0
        if rows != total and self.parallel is not None and rows * self.parallel.degree == total:
            offset = self.parallel.shard_index * rows  # this rank's sequence shard of the table
        return rewrite_tables(cos, sin, grid.latent_frames, rope, self.knobs.reference_frames, s,
                              total_tokens=total, token_offset=offset)

    # -- helpers -----------------------------------------------------------------------------------
    def _count_ring_steps(self, result: RingResult) -> None:
        with self._lock:
            self.stats.ring_steps += result.steps
            self.stats.ring_steps_skipped += len(result.skipped)
            self.stats.last_skipped_key_shards = result.skipped

    def _planned_patches_per_frame(self, grid: LatentGrid) -> int:
        """The tokens per frame to plan for: the model's grid, unless the settings override the geometry
        (then the geometry module's rule, pattern.md §1, decides)."""
        s = self.settings
        if s.patches_per_frame is None and s.video_height is None and s.video_width is None:
            return grid.patches_per_frame
        try:
            return planned_patches_per_frame(s, self.family)
        except GeometryError:
            return 0  # reported by the caller as a geometry mismatch, with the numbers
