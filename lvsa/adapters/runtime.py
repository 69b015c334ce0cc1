"""What the lvsa layers of one installation share: the denoising step, the plans, the statistics, the fallback
policy, and the context of the forward being run.

A forward pre-hook on each transformer calls :meth:`LVSARuntime.begin_forward` with the latent grid and the
timestep of the call; the runtime follows the step (:class:`.steps.StepTracker`: the pipeline's schedule where
lvsa was applied to a pipeline, else the timestep) and builds that forward's frozen
:class:`~lvsa.attention.AttentionContext`, which the processors and the compiled op hand to the executor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import log
from ..attention import AttentionContext, DriverChoice, ExecutionStats, FallbackPolicy, PlanCache
from ..attention.layout import ContextParallel
from ..dense import DenseControls
from ..errors import ConfigError, GeometryError
from ..geometry import LatentGrid, ModelFamily, pick_factor, planned_patches_per_frame
from ..plan import PatternKnobs, SparsePlan, build_plan, rotates
from ..planning import knobs_from_settings
from ..steps import ScheduleSteps, StepTracker
from .compiled import CompiledCalls

if TYPE_CHECKING:
    from ..settings import LVSASettings

#: the statistics of an installation (``handle.stats``)
RuntimeStats = ExecutionStats


class LVSARuntime:
    def __init__(self, settings: LVSASettings, family: ModelFamily, vae_temporal_factor: int,
                 adapter_name: str, vae_spatial_factor: int | None = None) -> None:
        self.settings = settings
        self.family = family
        self.adapter_name = adapter_name
        self.vae_temporal_factor = pick_factor(settings, "vae_temporal_factor", vae_temporal_factor)
        self.vae_spatial_factor = pick_factor(settings, "vae_spatial_factor", vae_spatial_factor,
                                              family.vae_spatial_factor)
        self.knobs: PatternKnobs = knobs_from_settings(settings, family, self.vae_temporal_factor)
        self.stats = ExecutionStats()
        self.steps = StepTracker()
        self.plans = PlanCache(self.stats)
        self.fallback = FallbackPolicy(settings.fallback, self.stats)
        self.dense = DenseControls.from_settings(settings)
        #: the qualified names of the layers that run dense in every step (set by apply)
        self.dense_layers: frozenset[str] = frozenset()
        self._total_steps: int | None = None  # set_total_steps: a custom loop's step count
        self._warmup_said: tuple[int | None, int] | None = None
        self.context = self._context(None, 0, None)
        #: the grid of the forward being run, set by the forward pre-hook, also while dynamo traces (when the
        #: context is not built yet): what RIFLEx rewrites rotary tables for and how declared families split a
        #: sequence
        self.rope_grid: LatentGrid | None = None
        #: the sequence shards of that forward (its context-parallel degree, 1 in one process), set with it
        self.rope_shards = 1
        #: what torch.compile'd transformers reach through the custom ops (see .compiled)
        self.compiled = CompiledCalls(lambda: self.context)

    # -- per forward -------------------------------------------------------------------------------
    def begin_forward(self, grid: LatentGrid, timestep: Any, parallel: ContextParallel | None = None) -> int:
        """The context of a forward over ``grid`` at ``timestep``; returns its denoising step."""
        if parallel is not None:
            parallel.check_tokens(grid.latent_frames * grid.patches_per_frame, grid.latent_frames,
                                  grid.patches_per_frame)
        self.stats.ulysses_degree = parallel.ulysses.degree if parallel and parallel.ulysses else 1
        self.stats.ring_degree = parallel.ring.degree if parallel and parallel.ring else 1
        step = self.steps.observe(timestep)
        self.stats.steps = self.steps.steps_seen
        self.rope_grid, self.rope_shards = grid, parallel.degree if parallel else 1
        self.context = self._context(grid, self._plan_step(grid, step), parallel, step, self._dense_step(step))
        return step

    def _dense_step(self, step: int) -> bool:
        """Whether denoising ``step`` is one of the dense warm-up's (said once per run length)."""
        dense = self.dense
        if dense.warmup_count is None and not dense.warmup_fraction:
            return False
        total = self.steps.total_steps if self.steps.total_steps is not None else self._total_steps
        count = dense.warmup_steps(total)
        if self._warmup_said != (total, count):
            self._warmup_said = (total, count)
            line = dense.warmup_line(total)
            if line:
                log.info(line.removeprefix("[LVSA] "))
        return step < count

    def set_total_steps(self, steps: int) -> None:
        """For custom denoising loops: the run's number of steps, which a dense warm-up fraction needs (a
        pipeline's schedule gives it where lvsa was applied to the pipeline)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r}: must be an integer >= 1")
        self._total_steps = steps

    def plan_for(self, grid: LatentGrid, step: int = 0) -> SparsePlan:
        """The plan a forward over ``grid`` at denoising ``step`` runs (video tokens only), built outside the
        run's cache: what a preview prints is what the layers will get."""
        planned = self._planned_patches_per_frame(grid)
        if planned != grid.patches_per_frame:
            overrides = [self.settings.given_as(name) for name in ("patches_per_frame", "video_height", "video_width")
                         if getattr(self.settings, name) is not None]
            raise GeometryError(
                f"{', '.join(overrides)} plans {planned or 'no'} tokens per frame, but the model's input has "
                f"{grid.patches_per_frame} per frame ({grid.latent_frames} frames): unset the override")
        return build_plan(grid.latent_frames, planned, self.knobs, text_position=self.family.text_position or "after",
                          step=self._plan_step(grid, step))

    def _plan_step(self, grid: LatentGrid, step: int) -> int:
        """The step a plan is built for: the denoising step when the keyframes rotate at this length, else 0."""
        return step if rotates(grid.latent_frames, self.knobs) else 0

    def _context(self, grid: LatentGrid | None, plan_step: int, parallel: ContextParallel | None,
                 denoising_step: int = 0, dense_step: bool = False) -> AttentionContext:
        return AttentionContext(
            grid=grid,
            patches_per_frame=0 if grid is None else self._planned_patches_per_frame(grid),
            step=plan_step,
            knobs=self.knobs,
            text_position=self.family.text_position or "after",
            parallel=parallel,
            driver=DriverChoice(self.settings.backend, self.settings.fallback),
            fallback=self.fallback,
            plans=self.plans,
            stats=self.stats,
            model=self.adapter_name,
            denoising_step=denoising_step,
            dense_step=dense_step,
            dense_layers=self.dense_layers,
        )

    @property
    def step(self) -> int:
        """The denoising step of the current forward."""
        return self.steps.step

    @property
    def schedule(self) -> ScheduleSteps:
        """The schedules of the pipelines lvsa was applied to (the exact step)."""
        return self.steps.schedule

    @property
    def last_plan(self) -> SparsePlan | None:
        """The plan built last."""
        return self.plans.last_plan

    def set_step(self, step: int) -> None:
        """For custom denoising loops: the step that the next forwards belong to."""
        self.steps.set_step(step)

    def reset(self) -> None:
        self.steps.reset()
        self.plans.clear()
        self.rope_grid, self.rope_shards = None, 1
        self.context = self._context(None, 0, None)

    # -- what the host reports ---------------------------------------------------------------------
    def processors_replaced(self, layers: list[str]) -> None:
        """Some of lvsa's layers were given another processor after apply: they no longer run through lvsa.
        An error under ``fallback=error``; else a loud line, once per set of layers, and counted."""
        detail = (f"{len(layers)} layers no longer run lvsa's processor (set_attn_processor or similar after "
                  f"lvsa.apply): {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}")
        self.fallback.fall_back(
            layers[0], "processor_replaced", detail, "Call lvsa.apply again after changing processors, or "
            "lvsa.remove first; LVSA_FALLBACK=warn runs them as they are", error=ConfigError, count=len(layers),
            once=len(layers), layers=len(layers))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a model with lvsa installed cannot be copied or pickled (its processors and hooks share one "
            "runtime, which a copy would split): lvsa.remove(model), copy it, then lvsa.apply to each copy")

    # -- helpers -----------------------------------------------------------------------------------
    def _planned_patches_per_frame(self, grid: LatentGrid) -> int:
        """The tokens per frame to plan for: the model's grid, unless the settings override the geometry
        (then the geometry module's rule, pattern.md §1, decides)."""
        s = self.settings
        if s.patches_per_frame is None and s.video_height is None and s.video_width is None:
            return grid.patches_per_frame
        try:
            return planned_patches_per_frame(s, self.family)
        except GeometryError:
            return 0  # reported by the layers as a geometry mismatch, with the numbers
