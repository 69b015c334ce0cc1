"""Which layer calls run dense whatever the sparse plan says: the dense warm-up (the first denoising steps,
where the layout of a video is decided) and the dense layers (chosen self-attention layers, every step).

The one owner of these rules: the settings validate through :func:`parse_layer_ranges`, the hosts resolve
the warm-up through :meth:`DenseControls.warmup_steps` and the layers through
:meth:`DenseControls.layer_names`, and the executor's context decides per layer call from what they
resolved (data, not a guard: a compiled graph serves dense and sparse calls alike). Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence


def parse_layer_ranges(text: str) -> tuple[int, ...]:
    """``"0-1, 28-29"`` -> ``(0, 1, 28, 29)``: layer indices and inclusive ranges, comma-separated, sorted and
    without repeats. Raises :class:`ValueError` with what is wrong (a settings validator's message)."""
    found: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.startswith("-"):
            raise ValueError(f"{part!r}: layer indices start at 0 (count from the first block)")
        first, dash, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ValueError(f"{part!r} is not a layer index or a range such as 28-29") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"{part!r}: layer indices start at 0 and a range goes up (28-29)")
        found.update(range(lo, hi + 1))
    if not found:
        raise ValueError("no layer given; use indices and ranges such as 0-1,28-29")
    return tuple(sorted(found))


def format_layer_ranges(layers: Sequence[int]) -> str:
    """``(0, 1, 28, 29)`` -> ``"0-1,28-29"`` (the canonical form, for messages)."""
    runs: list[str] = []
    ordered = sorted(set(layers))
    start = prev = None
    for index in [*ordered, None]:
        if start is not None and (index is None or index != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if index is not None and start is None:
            start = index
        prev = index
    return ",".join(runs)


@dataclass(frozen=True)
class DenseControls:
    """The dense warm-up (a count of steps, or a fraction of the run's steps) and the dense layers."""

    warmup_count: int | None = None
    warmup_fraction: float | None = None
    layers: tuple[int, ...] = ()
    #: how the user gave each, for messages (``LVSA_DENSE_WARMUP_FRACTION=0.2``)
    warmup_given_as: str = ""
    layers_given_as: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> DenseControls:
        """From :class:`lvsa.LVSASettings` (not imported here: the settings validate with this module)."""
        count, fraction = settings.dense_warmup_steps, settings.dense_warmup_fraction
        given = ""
        if count is not None:
            given = settings.given_as("dense_warmup_steps")
        elif fraction is not None:
            given = settings.given_as("dense_warmup_fraction")
        layers = parse_layer_ranges(settings.dense_layers) if settings.dense_layers else ()
        return cls(count, fraction, layers, given,
                   settings.given_as("dense_layers") if settings.dense_layers else "")

    @property
    def active(self) -> bool:
        return bool(self.warmup_count or self.warmup_fraction or self.layers)

    @property
    def needs_step_count(self) -> bool:
        """A fraction is resolved against the run's number of denoising steps."""
        return bool(self.warmup_fraction)

    def warmup_steps(self, total_steps: int | None) -> int:
        """How many leading denoising steps run dense: the count, or the fraction of ``total_steps`` rounded
        to the nearest step (0.2 of 50 steps: 10). A fraction without the step count is an error."""
        if self.warmup_count is not None:
            return self.warmup_count
        if not self.warmup_fraction:
            return 0
        if total_steps is None:
            raise ConfigError(
                f"{self.warmup_given_as} is a fraction of the denoising steps, and lvsa does not know how many "
                "there are: apply lvsa to the pipeline (it reads the scheduler's timesteps), call "
                "handle.runtime.set_total_steps(n) in a custom loop, or give a count (LVSA_DENSE_WARMUP_STEPS)")
        return int(self.warmup_fraction * total_steps + 0.5)

    def warmup_line(self, total_steps: int | None) -> str | None:
        """``[LVSA] dense warm-up: steps 0-9 of 50 run dense, 10-49 sparse (LVSA_DENSE_WARMUP_FRACTION=0.2)``
        (None: no warm-up asked for)."""
        if not self.warmup_given_as:
            return None
        count = self.warmup_steps(total_steps)
        of = f" of {total_steps}" if total_steps is not None else ""
        if count == 0:
            said = f"no step{of} runs dense"
        elif total_steps is not None and count >= total_steps:
            said = f"all {total_steps} steps run dense"
        else:
            said = f"step 0{of} runs dense" if count == 1 else f"steps 0-{count - 1}{of} run dense"
            if total_steps is not None:
                said += f", {count}-{total_steps - 1} sparse" if count < total_steps - 1 else f", {count} sparse"
        return f"[LVSA] dense warm-up: {said} ({self.warmup_given_as})"

    def layer_names(self, layers_per_transformer: Sequence[Sequence[str]], described: str = "") -> frozenset[str]:
        """The qualified names of the dense layers: index ``i`` is the ``i``-th self-attention layer of each
        transformer (both of Wan 2.2 A14B). An index past the model's layers is an error naming the count."""
        if not self.layers:
            return frozenset()
        names: set[str] = set()
        for layers in layers_per_transformer:
            too_far = [i for i in self.layers if i >= len(layers)]
            if too_far:
                raise ConfigError(
                    f"{self.layers_given_as}: {described or 'the model'} has {len(layers)} self-attention layers "
                    f"(0-{len(layers) - 1}), so layer {format_layer_ranges(too_far)} does not exist")
            names.update(layers[i] for i in self.layers)
        return frozenset(names)

    def refuse(self, host: str) -> None:
        """A host that cannot resolve the controls says so before any work (never silently sparse)."""
        if self.active:
            given = " and ".join(g for g in (self.warmup_given_as, self.layers_given_as) if g)
            raise ConfigError(f"{given}: the dense warm-up and dense layers are not supported by {host} yet; "
                              "unset them (lvsa.apply on a diffusers pipeline supports them)")

    def layers_line(self, count: int | None = None) -> str | None:
        """``[LVSA] dense layers: 4 of 30 self-attention layers (0-1,28-29) run dense in every step (...)``."""
        if not self.layers:
            return None
        of = f" of {count}" if count is not None else ""
        return (f"[LVSA] dense layers: {len(self.layers)}{of} self-attention layers "
                f"({format_layer_ranges(self.layers)}) run dense in every step ({self.layers_given_as})")
