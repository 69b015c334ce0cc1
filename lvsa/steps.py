"""Which denoising step a transformer forward belongs to.

Two signals, in this order:

1. **The pipeline's schedule** (when lvsa was applied to a pipeline): diffusers' video pipelines expose the
   step's timestep as ``pipe.current_timestep``, an element of ``pipe.scheduler.timesteps`` at the
   scheduler's own precision, and ``set_timesteps`` makes a new ``timesteps`` tensor for every generation.
   The step is that element's position in the schedule: exact whatever dtype the transformer runs in, the
   same for both CFG branches and both transformers of Wan 2.2, and a new (or interrupted and restarted)
   generation starts again at 0.
2. **The timestep the transformer is called with** (a bare transformer, or a custom loop): a new step when
   it goes down, a new generation when it goes up. A timestep cast to bfloat16 or float16 can collide
   (1000, 996, 996, 992, ...), so that case is warned about once, and :meth:`StepTracker.set_step` (the
   runtime's ``set_step``) lets a custom loop state the step itself.

:class:`StepTracker` owns this rule; every host asks it once per transformer forward (the diffusers runtime,
and vLLM-Omni's host for models whose pipelines record no step)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from . import log


class ScheduleSteps:
    """Step positions read off the schedules of the pipelines lvsa was applied to."""

    def __init__(self) -> None:
        self._pipelines: list[weakref.ref] = []
        self._schedule: tuple[int, list[float]] | None = None  # (id of the timesteps tensor, its values)
        self._timesteps: Any = None  # the tensor itself, so that its id stays unique while cached
        self._last = 0
        self._vector: tuple[float, ...] | None = None  # the last per-frame timestep vector
        self._vector_steps = 0
        self._last_vector_schedule: int | None = None
        #: the number of steps of the schedule :meth:`current` found last (its timesteps)
        self.length: int | None = None

    def add(self, pipeline: Any) -> None:
        if not any(ref() is pipeline for ref in self._pipelines):
            self._pipelines.append(weakref.ref(pipeline))

    @property
    def pipelines(self) -> list[Any]:
        return [p for p in (ref() for ref in self._pipelines) if p is not None]

    def current(self) -> tuple[int, int] | None:
        """``(generation, step)`` of the pipeline now in its denoising loop, or ``None`` when no pipeline of
        this handle is (a custom loop, or the transformer called by a pipeline lvsa was not applied to)."""
        for pipe in self.pipelines:
            t = getattr(pipe, "_current_timestep", None)
            scheduler = getattr(pipe, "scheduler", None)
            timesteps = getattr(scheduler, "timesteps", None)
            if t is None or timesteps is None or not hasattr(timesteps, "tolist"):
                continue
            if self._timesteps is not timesteps:
                self._timesteps = timesteps
                self._schedule = (id(timesteps), [float(x) for x in timesteps.tolist()])
                self._last = 0
                self._vector = None
            if getattr(t, "numel", None) is not None and t.numel() > 1:
                return self._per_frame_step(t)
            values = self._schedule[1]
            value = float(t)
            # from the last position on: the step never goes back within a generation
            for start in (self._last, 0):
                try:
                    index = values.index(value, start)
                except ValueError:
                    continue
                self._last = index
                self.length = len(values)
                return self._schedule[0], index
        return None

    def _per_frame_step(self, t: Any) -> tuple[int, int]:
        """A pipeline whose step has one timestep per frame (SkyReels-V2's diffusion forcing walks a step
        matrix, not the scheduler's timesteps): each new timestep vector is the next step of the loop. How
        many steps the loop takes is not known from the schedule."""
        vector = tuple(float(x) for x in t.detach().flatten().tolist())
        if vector != self._vector:
            self._vector = vector
            self._vector_steps = 0 if self._last_vector_schedule != self._schedule[0] else self._vector_steps + 1
            self._last_vector_schedule = self._schedule[0]
        self.length = None
        return self._schedule[0], self._vector_steps


class StepTracker:
    """The denoising step of the forwards of one lvsa handle (the rule above)."""

    def __init__(self) -> None:
        self.schedule = ScheduleSteps()
        self.step = 0
        self.steps_seen = 0
        #: the denoising steps of the run the last forward belongs to, where the pipeline's schedule tells
        self.total_steps: int | None = None
        self._position: tuple[int, int] | None = None
        self._last_timestep: float | None = None
        self._pinned = False
        self._warned_precision = False
        self._lock = threading.Lock()

    def observe(self, timestep: Any) -> int:
        """The step of a forward called with ``timestep``; counts a new step when it is one."""
        position = self.schedule.current()
        self.total_steps = self.schedule.length if position is not None else None
        value = None
        if position is None:
            value = _timestep_value(timestep)
            self._warn_low_precision(timestep)
        with self._lock:
            if position is not None:
                if position != self._position:
                    self._position = position
                    self.step = position[1]
                    self.steps_seen += 1
                self._last_timestep = None
            elif value is not None and value != self._last_timestep:
                if self._pinned:
                    self._pinned = False  # set_step chose this step: this timestep is its reference
                elif self._last_timestep is None or value > self._last_timestep:
                    self.step = 0
                else:
                    self.step += 1
                self.steps_seen += 1
                self._last_timestep = value
            return self.step

    def set_step(self, step: int) -> None:
        """For custom denoising loops: the step that the next forwards belong to."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}: must be an integer >= 0")
        with self._lock:
            self.step = step
            self._last_timestep = None
            self._pinned = True

    def reset(self) -> None:
        with self._lock:
            self.step, self._last_timestep, self._pinned, self._position = 0, None, False, None

    def _warn_low_precision(self, timestep: Any) -> None:
        dtype = getattr(timestep, "dtype", None)
        if dtype is None or getattr(dtype, "is_floating_point", False) is False or dtype.itemsize > 2:
            return
        if self._warned_precision:
            return
        self._warned_precision = True
        log.logger.warning(
            "[LVSA] the timestep reaches the transformer in %s, where neighbouring steps can round to the "
            "same value and the keyframe rotation would skip a step: apply lvsa to the pipeline "
            "(lvsa.apply(pipe)), which reads the step off the pipeline's schedule, or call "
            "handle.runtime.set_step(i) in a custom loop", str(dtype).removeprefix("torch."))


def _timestep_value(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if hasattr(timestep, "numel"):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().max())
    return float(timestep)
