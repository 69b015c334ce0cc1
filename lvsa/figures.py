"""Pictures people would rather look at than read: the mask of a plan (``lvsa plan --png``) and the line charts
of the benchmarks' JSON (``benchmarks/figures.py``). matplotlib is an optional extra (``lvsa[figures]``),
imported only here and only when a picture is asked for; figures are drawn on a :class:`Figure` without
pyplot (no window, no global state) and written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .files import atomic_write

if TYPE_CHECKING:
    from .plan import SparsePlan

#: colours of the mask's cells: skipped, window only, global only, both
MASK_COLOURS = ("#f2f2f2", "#4c8bd6", "#f29e38", "#8c5bb8")
MASK_LABELS = ("skipped", "local window", "global (first frames, keyframes)", "global and window")
DPI = 100


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("pictures need matplotlib: pip install 'lvsa[figures]'") from None
    return matplotlib


def new_figure(width_px: int, height_px: int) -> Any:
    """A figure of exactly ``width_px x height_px`` pixels when saved (no pyplot)."""
    _matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def save(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically: a reader never sees half a file)."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"{target}: pictures are written as PNG; name the file *.png")
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    return target


def mask_cells(plan: SparsePlan) -> list[list[int]]:
    """Per query frame and key frame: 0 skipped, 1 window, 2 global, 3 both (the codes of :data:`MASK_COLOURS`)."""
    globals_ = set(plan.globals)
    return [[(2 if k in globals_ else 0) + (1 if lo <= k <= hi else 0) for k in range(plan.latent_frames)]
            for lo, hi in plan.windows]


def mask_title(plan: SparsePlan, label: str = "") -> str:
    unit = "token frames" if plan.temporal_patch > 1 else "latent frames"
    rotation = (f"step {plan.step}, keyframes rotated by {plan.offset}" if plan.rotating
                else f"step {plan.step}, no rotation")
    head = f"{label}: " if label else ""
    return (f"{head}{plan.latent_frames} {unit} x {plan.patches_per_frame} tokens, kfi={plan.keyframe_interval}, "
            f"{plan.attended_per_frame}/{plan.latent_frames} attended\n{rotation}, density {plan.density:.3f}")


def draw_mask(axes: Any, plan: SparsePlan, label: str = "") -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    axes.imshow(mask_cells(plan), cmap=ListedColormap(MASK_COLOURS), vmin=0, vmax=3, interpolation="nearest")
    axes.set_xlabel("key frame")
    axes.set_ylabel("query frame")
    axes.set_title(mask_title(plan, label), fontsize=9)
    used = {code for row in mask_cells(plan) for code in row}
    axes.figure.legend(handles=[Patch(color=MASK_COLOURS[c], label=MASK_LABELS[c]) for c in sorted(used)],
                       loc="outside lower center", ncol=2, fontsize=8, frameon=False)


def mask_png(plan: SparsePlan, path: str | Path, label: str = "", size: tuple[int, int] = (640, 720)) -> Path:
    """The plan's mask as a ``size`` PNG: query frames down, key frames across, globals and window coloured."""
    figure = new_figure(*size)
    draw_mask(figure.add_subplot(), plan, label)
    return save(figure, path)


def line_chart(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, size: tuple[int, int] = (800, 500), dashed: Sequence[str] = (),
               percent: bool = False) -> Path:
    """One chart of named ``(x, y)`` series (``dashed``: the names drawn dashed, such as an ideal)."""
    figure = new_figure(*size)
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        axes.plot(list(xs), list(ys), marker="o", linestyle="--" if name in dashed else "-", label=name)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if percent:
        from matplotlib.ticker import PercentFormatter

        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save(figure, path)


def bar_chart(path: str | Path, labels: Sequence[str], values: dict[str, Sequence[float]], *, title: str,
              ylabel: str, size: tuple[int, int] = (800, 500), percent: bool = False,
              reference: float | None = None) -> Path:
    """Grouped bars: one group per label, one bar per series (``reference``: a horizontal line, e.g. 100%)."""
    figure = new_figure(*size)
    axes = figure.add_subplot()
    width = 0.8 / max(len(values), 1)
    for index, (name, ys) in enumerate(values.items()):
        axes.bar([i + index * width for i in range(len(labels))], list(ys), width, label=name)
    axes.set_xticks([i + width * (len(values) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
    if reference is not None:
        axes.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    if percent:
        from matplotlib.ticker import PercentFormatter

        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return save(figure, path)
