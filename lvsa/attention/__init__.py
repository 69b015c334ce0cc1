"""The execution wing: the only place a layer call is executed, whoever hosts the model.

A host (diffusers' processors and compiled ops in :mod:`lvsa.adapters`, a serving engine's attention
backend) builds one :class:`AttentionContext` per forward and calls :func:`execute` for every layer; the
wing does the Ulysses exchange, flat or ring attention, the joined text and the dense fallback, through one
driver choice and one prepared-state cache (:mod:`.drivers`). It never imports a host."""

from __future__ import annotations

from .context import AttentionContext, ExecutionStats, FallbackPolicy, PlanCache
from .drivers import DriverChoice, DriverRequest, prepared_states, select_driver, sparse_attention
from .executor import PLAN_IN_CALL, execute
from .layout import ContextParallel, RingGroup, check_degrees
from .references import FrameReferences

__all__ = ["PLAN_IN_CALL", "AttentionContext", "ContextParallel", "DriverChoice", "DriverRequest",
           "ExecutionStats", "FallbackPolicy", "FrameReferences", "PlanCache", "RingGroup", "check_degrees", "execute",
           "prepared_states", "select_driver", "sparse_attention"]
