"""How the benchmarks time calls: the one rule for ``attention.py``, ``fa4_ceiling.py`` and
``ring_compute.py``.

Two ways, both the median over ``repeats`` calls after ``warmup`` calls:

- **queued** (the default for kernels): the calls are queued back to back, as a transformer's layers queue
  their attention, and device events around each call measure the device's time for it. The host's own work
  for a call (FlexAttention's compiled wrapper spends 0.45-1.0 ms there before its kernel starts) overlaps
  the previous call, as it does inside a forward; it counts only where the host falls behind the device.
- **synchronized**: the host waits for the device before and after each call and reads its clock, so the
  host's work for the call counts in full (what one isolated call costs).

On a device without events (the CPU) both are the synchronized way.

Methods that are compared are timed **interleaved** (:func:`interleaved`): every round calls each method once,
in an order shuffled per round (seeded). A lent H100 drifts by 5-15% within seconds and even alternates
between fast and slow rounds (clocks and power, measured 2026-11-24), so methods timed one after the other
differ by the drift as much as by their speed; taken in turn, every method sees the same device, and the
shuffle keeps a method from always following the same one (a hot kernel before it, a cool one after).

A speedup of one method over another is the median over the rounds of the ratio of their times in that round
(:func:`speedup`): the two calls of a round ran within a fraction of a second of each other, so the drift
cancels in the ratio, while the ratio of the two medians keeps the round-to-round spread (3-9% on a lent
H100)."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

Timing = Literal["queued", "synchronized"]
TIMINGS: tuple[Timing, ...] = ("queued", "synchronized")


def interleaved(fns: Sequence[Callable[[], Any]], device: Any, warmup: int, repeats: int,
                timing: Timing = "queued", seed: int = 0) -> tuple[list[list[float]], list[Any]]:
    """Milliseconds of each method's ``repeats`` calls on ``device`` (an lvsa device module) and each one's
    last output. After ``warmup`` rounds in the given order, each of ``repeats`` rounds calls every method
    once, in an order shuffled by a generator seeded with ``seed``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    shuffler = random.Random(seed)
    rounds = [shuffler.sample(range(len(fns)), len(fns)) for _ in range(repeats)]
    outs: list[Any] = [None] * len(fns)
    for _ in range(warmup):
        for i, fn in enumerate(fns):
            outs[i] = fn()
    if timing == "queued" and device.name != "cpu":
        def event() -> Any:
            return torch.Event(device=device.name, enable_timing=True)

        events = [[(event(), event()) for _ in fns] for _ in range(repeats)]
        device.synchronize()
        for order, pairs in zip(rounds, events, strict=True):
            for i in order:
                start, end = pairs[i]
                start.record()
                outs[i] = fns[i]()
                end.record()
        device.synchronize()
        return [[pairs[i][0].elapsed_time(pairs[i][1]) for pairs in events] for i in range(len(fns))], outs
    times: list[list[float]] = [[] for _ in fns]
    for order in rounds:
        for i in order:
            device.synchronize()
            start_s = time.perf_counter()
            outs[i] = fns[i]()
            device.synchronize()
            times[i].append((time.perf_counter() - start_s) * 1e3)
    return times, outs


def speedup(reference_ms: Sequence[float], ms: Sequence[float]) -> float:
    """How many times faster a method ran than the reference, from their times in the same rounds of
    :func:`interleaved`: the median over rounds of the per-round ratio."""
    if len(reference_ms) != len(ms) or not ms:
        raise ValueError(f"speedup needs the same rounds of both methods, got {len(reference_ms)} and {len(ms)}")
    return statistics.median(r / m for r, m in zip(reference_ms, ms, strict=True))


def timed(fn: Callable[[], Any], device: Any, warmup: int, repeats: int,
          timing: Timing = "queued") -> tuple[float, Any]:
    """Median milliseconds of ``fn()`` alone (see :func:`interleaved`), and its last output."""
    (times,), (out,) = interleaved([fn], device, warmup, repeats, timing)
    return statistics.median(times), out


def add_arguments(parser: argparse.ArgumentParser, repeats: int = 5, warmup: int = 2) -> None:
    """``--repeats``, ``--warmup`` and ``--timing``, the same in every benchmark that times kernels."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed calls, median taken (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls first (default {warmup})")
    parser.add_argument("--timing", choices=TIMINGS, default="queued",
                        help="queued: calls back to back, device events around each, as a layer inside a forward "
                             "(default); synchronized: host clock around each call, the host's work included")

