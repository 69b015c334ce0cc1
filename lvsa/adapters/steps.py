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
   (1000, 996, 996, 992, ...), so that case is warned about once, and :meth:`LVSARuntime.set_step` lets
   a custom loop state the step itself."""

from __future__ import annotations

import weakref
from typing import Any


class ScheduleSteps:
    """Step positions read off the schedules of the pipelines lvsa was applied to."""

    def __init__(self) -> None:
        self._pipelines: list[weakref.ref] = []
        self._schedule: tuple[int, list[float]] | None = None  # (id of the timesteps tensor, its values)
        self._timesteps: Any = None  # the tensor itself, so that its id stays unique while cached
        self._last = 0

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
            values = self._schedule[1]
            value = float(t)
            # from the last position on: the step never goes back within a generation
            for start in (self._last, 0):
                try:
                    index = values.index(value, start)
                except ValueError:
                    continue
                self._last = index
                return self._schedule[0], index
        return None
