"""Choosing a driver for a call, and its prepared state: one choice and one prepared-state cache for the flat
and the ring paths alike. (Whether each driver can run here, and why not, is :mod:`lvsa.driver_status`.)

The choice is cached per (request, policy, problem), the prepared state per (driver, plan, problem, form),
so a layer call costs a dictionary lookup before the kernels run. A plan that changes shape is logged once
with the ``[LVSA]`` lines; a driver that cannot run is an error naming every installed driver, or, under
``LVSA_FALLBACK=warn``, a ``[LVSA-FALLBACK]`` line and the next driver."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar, cast

from .. import caches, log, registry
from ..driver import AttentionProblem, Driver, Prepared, PreparedT
from ..driver_status import driver_status, status_table
from ..errors import DriverUnavailable

if TYPE_CHECKING:
    import torch

    from ..plan import SparsePlan
    from ..settings import LVSASettings

_PREPARED_CACHE_SIZE = 16
StateT = TypeVar("StateT", bound=Prepared)


class DriverRequest(Protocol):
    """What picks a driver: the requested name (``auto`` or a driver) and the policy when it cannot run.
    :class:`DriverChoice` and :class:`~lvsa.LVSASettings` both answer it."""

    @property
    def backend(self) -> str: ...

    @property
    def fallback(self) -> str: ...


@dataclass(frozen=True)
class DriverChoice:
    backend: str = "auto"
    fallback: Literal["error", "warn"] = "error"


def _auto_choice(problem: AttentionProblem, exclude: str | None = None,
                 lse: bool = False) -> tuple[Driver | None, list[str]]:
    skipped = []
    ordered = sorted(registry.drivers().items(), key=lambda item: -item[1].priority)
    for name, driver in ordered:
        if not driver.auto_select or name == exclude:
            continue
        status = driver_status(name, problem.device_type, problem, lse)
        if status.available:
            return driver, skipped
        skipped.append(f"{name}: {status.reason}")
    return None, skipped


_choice_lock = threading.Lock()
_choices: dict[tuple[str, str, AttentionProblem, bool], Driver] = {}


def select_driver(problem: AttentionProblem, requested: str, fallback: str, lse: bool = False) -> Driver:
    """The driver for ``problem``: the requested one, the best one under ``auto``, or (fallback=warn) the
    best other one with a loud ``[LVSA-FALLBACK]`` line. Cached per (request, policy, problem). ``lse``: the
    driver must run ring attention's steps (attention with log-sum-exp, :meth:`Driver.check_lse`)."""
    key = (requested, fallback, problem, lse)
    chosen = _choices.get(key)
    if chosen is not None:
        return chosen
    with _choice_lock:
        chosen = _select(problem, requested, fallback, lse)
        _choices[key] = chosen
    return chosen


def _select(problem: AttentionProblem, requested: str, fallback: str, lse: bool) -> Driver:
    what = "this call with log-sum-exp (ring steps, frame-paired reference keys)" if lse else "this call"
    if requested == "auto":
        driver, skipped = _auto_choice(problem, lse=lse)
        if driver is None:
            raise DriverUnavailable(
                f"no lvsa driver can run {what} on {problem.device}:\n"
                f"{status_table(problem.device_type, problem, lse)}"
            )
        if skipped:
            log.info(f"backend=auto chose {driver.name} for {what} on {problem.device} "
                     f"(skipped {'; '.join(skipped)})")
        return driver
    status = driver_status(requested, problem.device_type, problem, lse)
    if status.available:
        return registry.drivers()[requested]
    if fallback == "warn":
        driver, _ = _auto_choice(problem, exclude=requested, lse=lse)
        if driver is not None:
            log.fallback("dispatch", status.code, requested=requested, using=driver.name,
                         device=problem.device, detail=status.reason)
            return driver
    raise _unavailable(requested, what, problem.device, problem.device_type, status.reason, fallback, problem, lse)


def _unavailable(requested: str, what: str, device: str, device_type: str, reason: str, fallback: str,
                 problem: AttentionProblem | None = None, lse: bool = False) -> DriverUnavailable:
    hint = "" if fallback == "warn" else "\nSet LVSA_FALLBACK=warn (--fallback warn) to use the next usable driver."
    return DriverUnavailable(
        f"backend {requested!r} cannot run {what} on {device}: {reason}\n"
        f"installed drivers on {device_type}:\n{status_table(device_type, problem, lse)}{hint}"
    )


def check_requested(request: DriverRequest, device_type: str) -> None:
    """Before any work: the requested driver (not ``auto``) is installed and can run on ``device_type`` here, or
    the error a first layer call would raise, now (under ``fallback=warn`` a call falls back loudly instead)."""
    requested = request.backend.lower()
    if requested == "auto" or request.fallback == "warn":
        return
    status = driver_status(requested, device_type)
    if not status.available:
        raise _unavailable(requested, "this run", device_type, device_type, status.reason, request.fallback)


_prepared_lock = threading.Lock()
_prepared: OrderedDict[tuple[str, SparsePlan, AttentionProblem, Hashable], Prepared] = OrderedDict()
_last_logged_shape: list[tuple[int, ...] | None] = [None]


def prepared_for(driver: Driver[PreparedT], plan: SparsePlan, problem: AttentionProblem) -> PreparedT:
    """The driver's prepared state for this plan and problem, built on first use (LRU-cached)."""
    return cached_state(driver, plan, problem, None, lambda: _checked(driver, driver.prepare(plan, problem), problem))


def cached_state(driver: Driver, plan: SparsePlan, problem: AttentionProblem, form: Hashable,
                 build: Callable[[], StateT]) -> StateT:
    """The one prepared-state cache: what ``build`` makes for (driver, plan, problem, ``form``), built on first
    use and kept while it is among the last few used. ``form`` None is the driver's own :meth:`Driver.prepare`;
    the ring path keeps its per-shard indices here under its own form."""
    key = (driver.name, plan, problem, form)
    with _prepared_lock:
        state = _prepared.get(key)
        if state is not None:
            _prepared.move_to_end(key)
            return cast(StateT, state)
    state = build()
    with _prepared_lock:
        _prepared[key] = state
        while len(_prepared) > _PREPARED_CACHE_SIZE:
            _prepared.popitem(last=False)
    log_plan_once(plan)
    return state


def _checked(driver: Driver, state: object, problem: AttentionProblem) -> Prepared:
    if not isinstance(state, Prepared) or state.problem != problem:
        # state without the problem would run with a scale other than the caller's, without a word
        raise DriverUnavailable(
            f"driver {driver.name!r}: prepare() returned {type(state).__name__}, not a lvsa.driver.Prepared made for "
            "this problem; the driver contract carries the plan, the problem and the softmax scale in the "
            "prepared state (see docs/architecture.md, 'Adding a driver')")
    return state


def prepared_states() -> list[tuple[str, Prepared]]:
    """``(driver name, state)`` of every prepared state now cached, oldest first (for reports and tests)."""
    with _prepared_lock:
        return [(key[0], state) for key, state in _prepared.items()]


def log_plan_once(plan: SparsePlan) -> None:
    """The ``[LVSA]`` lines of a plan, when its shape differs from the last one logged (not per layer or step).
    A forced-dense plan (warm-up step, dense layer) is not logged: the host's dense lines say which calls
    run dense, and interleaved dense layers would otherwise log at every switch."""
    if plan.forced_dense:
        return
    with _prepared_lock:
        if plan.shape_key() == _last_logged_shape[0]:
            return
        _last_logged_shape[0] = plan.shape_key()
    for line in plan.log_lines():
        log.logger.info(line)


def _clear() -> None:
    with _prepared_lock:
        _prepared.clear()
        _last_logged_shape[0] = None
    with _choice_lock:
        _choices.clear()


caches.register("drivers", _clear)


def run_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan, request: DriverRequest,
             key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """One call of the whole sequence under ``plan`` through the driver ``request`` picks."""
    problem = AttentionProblem.from_tensors(q, k, v, plan, key_padding_mask, scale)
    driver = select_driver(problem, request.backend.lower(), request.fallback)
    return driver.run(prepared_for(driver, plan, problem), q, k, v, key_padding_mask)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    *,
    backend: str | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    settings: LVSASettings | None = None,
) -> torch.Tensor:
    """Frame-sparse attention of ``[batch, seq, heads, head_dim]`` tensors (diffusers' layout).

    ``k``/``v`` may have fewer heads than ``q`` (GQA). Text tokens of the plan attend everything and are
    attended by every query; ``key_padding_mask`` (``[batch, text_tokens]``, True = keep) masks padded text
    keys. ``backend`` overrides the settings' ``backend``; ``scale`` defaults to ``1/sqrt(head_dim)``."""
    if settings is None:
        from ..settings import get_settings

        settings = get_settings()
    request = DriverChoice(backend or settings.backend, settings.fallback)
    return run_plan(q, k, v, plan, request, key_padding_mask, scale)
