"""The scheduler: geometry and knobs in, a :class:`SparsePlan` out. Pure Python, deterministic, no device.
The rule and its formulas are written in ``docs/pattern.md``; the functions below cite its sections.

Vocabulary (all in latent frames): ``T`` frames, ``P`` tokens per frame, ``W`` window half-width,
``n_first`` leading frames that are always global, ``kfi`` keyframe interval. Each query frame attends the
global frames (leading + periodic keyframes) and a local window; text tokens, if any, are dense both ways.

One departure from the original tool, to keep its promises (pattern.md §4): it places periodic keyframes at
``(o + i*kfi) mod T``, whose union with the leading frames changes size with the offset ``o`` (at ``o=0``
keyframe 0 coincides with frame 0, at ``o=1`` it does not). We place them on the ring of non-leading
frames instead, at ``n_first + (base + o + i*kfi) mod (T - n_first)``: identical to the spec at ``o=0``
(so ``kfi=6 global_count=14`` at T=81 as users know it), the same count at every offset, and, since the
offset is ``step mod (T - n_first)``, the grid moves one frame per step and every frame serves as a
global within any ``2*kfi - 1`` consecutive steps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from .errors import ConfigError, GeometryError
from .geometry import FAMILIES, TextPosition, token_frames, video_frames_to_latent


@dataclass(frozen=True)
class PatternKnobs:
    """The knobs of the pattern, already in frames of the plan (token frames: latent frames grouped by the
    transformer's temporal patch; without temporal patching, latent frames). Only the reference horizon is
    kept in latent frames, the unit users set it in."""

    reference_latent_frames: int
    sparsity_scale: float
    window: int  # W
    n_first: int
    key_frame_interval: int | None  # None: derive from the budget (auto keyframes)
    rotate: bool | None  # None: rotate whenever the plan is sparse
    temporal_patch: int = 1  # latent frames per frame of the plan

    @property
    def reference_frames(self) -> int:
        """The reference horizon in frames of the plan."""
        return token_frames(self.reference_latent_frames, self.temporal_patch)

    @property
    def scaled_reference(self) -> int:
        return max(self.n_first + 1, int(self.reference_frames * self.sparsity_scale))


def choose_keyframe_interval(T: int, knobs: PatternKnobs) -> int:
    """pattern.md §3: 1 (fully dense) within the budget, else the sparsest interval meeting it."""
    scaled_ref = knobs.scaled_reference
    if T <= scaled_ref:
        return 1
    if knobs.key_frame_interval is not None:
        return min(knobs.key_frame_interval, T)
    W, n_first = knobs.window, knobs.n_first
    target_attended = min(scaled_ref, T)
    target_globals = max(n_first, target_attended - min(2 * W + 1, T))
    leading = set(range(n_first))
    strict = 1
    for k in range(T, 0, -1):
        if len(leading | set(range(0, T, k))) >= target_globals:
            strict = k
            break
    m = 2 * W + n_first
    fallback = math.ceil(max(T - m, scaled_ref - m) / max(scaled_ref - m, 1))
    return max(strict, fallback)


def global_frames(T: int, n_first: int, kfi: int, offset: int) -> tuple[int, ...]:
    """pattern.md §4: leading frames plus periodic keyframes on the ring of non-leading frames at ``offset``."""
    n_first = min(n_first, T)
    leading = list(range(n_first))
    ring = T - n_first
    if kfi == 1 or ring == 0:
        return tuple(range(T))
    start = -(-n_first // kfi) * kfi  # the first multiple of kfi at or after n_first
    count = len(range(start, T, kfi))  # periodic keyframes outside the leading frames at offset 0
    base = start - n_first
    periodic = {n_first + (base + offset + i * kfi) % ring for i in range(count)}
    return tuple(sorted([*leading, *periodic]))


def local_window(f: int, T: int, W: int, is_global: list[bool], need: int) -> tuple[int, int]:
    """pattern.md §5: a constant-width window shifted at the edges, widened outward (left first,
    alternating) until it holds ``need`` non-global frames or spans everything."""
    lo = max(0, min(f - W, T - 1 - 2 * W))
    hi = min(T - 1, max(f + W, 2 * W))
    count = sum(1 for g in is_global[lo : hi + 1] if not g)
    left_turn = True
    while count < need and (lo > 0 or hi < T - 1):
        if (left_turn and lo > 0) or hi == T - 1:
            lo -= 1
            count += not is_global[lo]
        else:
            hi += 1
            count += not is_global[hi]
        left_turn = not left_turn
    return lo, hi


@dataclass(frozen=True)
class SparsePlan:
    """Which key frames every query frame attends, for one geometry and one denoising step.

    Immutable and hashable: drivers cache what they build from a plan (index tensors, kernel plans) keyed
    by it, so a plan is prepared once per change (geometry, or rotation at a new step), not per layer."""

    latent_frames: int  # T
    patches_per_frame: int  # P
    text_tokens: int
    text_position: TextPosition
    step: int
    offset: int  # rotation offset used for this step
    keyframe_interval: int  # "kfi" in the [LVSA] line
    window: int  # W
    n_first: int
    reference_latent_frames: int
    sparsity_scale: float
    rotating: bool
    globals: tuple[int, ...]
    windows: tuple[tuple[int, int], ...] = field(repr=False)  # inclusive (lo, hi) per query frame
    #: latent frames per frame of the plan: its frames are token frames when the transformer patches time
    temporal_patch: int = 1
    #: dense whatever the budget: a dense warm-up step or a dense layer (:mod:`lvsa.dense`)
    forced_dense: bool = False

    # ---- frame level -----------------------------------------------------------------------------
    @property
    def kfi(self) -> int:
        """The keyframe interval under the short name of the ``[LVSA] kfi=`` line."""
        return self.keyframe_interval

    @property
    def is_dense(self) -> bool:
        """Every video query attends every video key (kfi=1, or the pattern covers all frames)."""
        return self.attended_per_frame == self.latent_frames

    @cached_property
    def _global_set(self) -> frozenset[int]:
        return frozenset(self.globals)

    def attended(self, f: int) -> tuple[int, ...]:
        """Sorted key frames attended by query frame ``f``: globals plus its window."""
        if not 0 <= f < self.latent_frames:
            raise IndexError(f"frame {f} outside 0..{self.latent_frames - 1}")
        return self._rows[f]

    @cached_property
    def _rows(self) -> tuple[tuple[int, ...], ...]:
        rows = []
        for lo, hi in self.windows:
            rows.append(tuple(sorted(self._global_set.union(range(lo, hi + 1)))))
        return tuple(rows)

    @property
    def attended_per_frame(self) -> int:
        """Attended key frames per query frame; the same for every frame by construction."""
        return len(self._rows[0])

    @cached_property
    def indptr(self) -> tuple[int, ...]:
        """Frame-level CSR row pointer (length T + 1)."""
        out = [0]
        for row in self._rows:
            out.append(out[-1] + len(row))
        return tuple(out)

    @cached_property
    def indices(self) -> tuple[int, ...]:
        """Frame-level CSR column indices: the attended key frames of each query frame, sorted."""
        return tuple(k for row in self._rows for k in row)

    # ---- token level -----------------------------------------------------------------------------
    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.patches_per_frame

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        """Index of the first video token in the sequence (text tokens may come first)."""
        return self.text_tokens if self.text_position == "before" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "before" else self.video_tokens

    @property
    def density(self) -> float:
        """Fraction of the full (query, key) token matrix that is computed, text rows and columns included."""
        S, V, P = self.seq_len, self.video_tokens, self.patches_per_frame
        text = self.text_tokens
        computed = text * S + V * text + self.latent_frames * self.attended_per_frame * P * P
        return computed / (S * S)

    # ---- what users read -------------------------------------------------------------------------
    def summary(self) -> str:
        """``[LVSA] kfi=6 global_count=14 attended_per_frame=21/81`` (frames of the plan: with temporal
        patching, token frames, which the line then names)."""
        line = (
            f"[LVSA] kfi={self.keyframe_interval} global_count={len(self.globals)} "
            f"attended_per_frame={self.attended_per_frame}/{self.latent_frames}"
        )
        if self.temporal_patch > 1:
            line += f" (token frames of {self.temporal_patch} latent frames)"
        if self.forced_dense:
            line += " (dense warm-up step or dense layer)"
        return line

    def extension_line(self) -> str:
        """``[LVSA] reference_latent_frames=33 target_latent_frames=49 extension_ratio=1.48x``; with temporal
        patching the ratio is over token frames, and the token frames are stated."""
        reference = token_frames(self.reference_latent_frames, self.temporal_patch)
        ratio = self.latent_frames / reference
        line = (
            f"[LVSA] reference_latent_frames={self.reference_latent_frames} "
            f"target_latent_frames={self.latent_frames * self.temporal_patch} extension_ratio={ratio:.2f}x"
        )
        if self.temporal_patch > 1:
            line += (f" reference_token_frames={reference} target_token_frames={self.latent_frames} "
                     f"({self.temporal_patch} latent frames per token frame)")
        return line

    def log_lines(self) -> list[str]:
        return [self.extension_line(), self.summary()]

    def mask_picture(self) -> str:
        """One row per query frame, one column per key frame: ``G`` global, ``W`` window, ``X`` both,
        ``.`` skipped; the attended count ends each row."""
        width = len(str(self.latent_frames - 1))
        lines = []
        for f, (lo, hi) in enumerate(self.windows):
            cells = []
            for k in range(self.latent_frames):
                g, w = k in self._global_set, lo <= k <= hi
                cells.append("X" if g and w else "G" if g else "W" if w else ".")
            lines.append(f"{f:>{width}} {''.join(cells)} {len(self._rows[f])}")
        return "\n".join(lines)

    def shape_key(self) -> tuple[int, int, int, int, int]:
        """What changes the ``[LVSA]`` lines (not the rotation): log again only when this changes."""
        return (self.latent_frames, self.patches_per_frame, self.keyframe_interval, len(self.globals),
                self.attended_per_frame)

    def frame_rows(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        return enumerate(self._rows)


def resolve_knobs(
    *,
    reference_latent_frames: int | None,
    sparsity_scale: float,
    window_size: int,
    n_first_frames: int,
    key_frame_interval: int | None,
    rotate: bool | None,
    vae_temporal_factor: int,
    temporal_patch: int = 1,
) -> PatternKnobs:
    """The pattern's knobs in frames of the plan (latent frames, or token frames for a transformer that
    patches time) from counts in video frames: ``window_size``, ``n_first_frames`` and ``key_frame_interval``
    (``None``: derived from the budget, auto keyframes) are divided by ``vae_temporal_factor x temporal_patch``
    video frames per frame of the plan. Raises :class:`ConfigError` for a horizon that is unknown or a
    keyframe spacing under one frame of the plan."""
    vt = vae_temporal_factor * temporal_patch  # video frames per frame of the plan
    if reference_latent_frames is None:
        raise ConfigError(
            "reference_latent_frames is unknown: set LVSA_REFERENCE_LATENT_FRAMES "
            "(flag --reference-latent-frames; Wan 21, HunyuanVideo 1.5 33, CogVideoX 13) or pass a model "
            f"family ({', '.join(FAMILIES)})"
        )
    kfi = None
    if key_frame_interval is not None:
        kfi = video_frames_to_latent(key_frame_interval, vt)
        if kfi < 1:
            unit = "latent frame" if temporal_patch == 1 else f"token frame ({temporal_patch} latent frames)"
            raise ConfigError(
                f"key_frame_interval={key_frame_interval} video frames is less than one {unit} "
                f"({vt} video frames); use at least {vt} (LVSA_KEY_FRAME_INTERVAL, --key-frame-interval)"
            )
    return PatternKnobs(
        reference_latent_frames=reference_latent_frames,
        sparsity_scale=sparsity_scale,
        window=video_frames_to_latent(window_size, vt),
        n_first=-(-n_first_frames // vt),  # any part of a latent frame makes it a leading frame
        key_frame_interval=kfi,
        rotate=rotate,
        temporal_patch=temporal_patch,
    )


def is_dense_at(latent_frames: int, knobs: PatternKnobs) -> bool:
    """Whether every step's plan over ``latent_frames`` covers every frame (kfi = 1: the grid is within the
    horizon), whatever the step. The one place this rule lives (rotation, and a host that leaves the model's
    own attention in a compiled graph within the horizon, ask it)."""
    return choose_keyframe_interval(latent_frames, knobs) == 1


def rotates(latent_frames: int, knobs: PatternKnobs) -> bool:
    """pattern.md §4. Whether the keyframes move with the step: a sparse plan rotates unless ``rotate`` is False;
    a dense one (kfi = 1) never does. The one place this rule lives (the runtime asks it to share one plan
    across the steps of a pattern that does not rotate)."""
    sparse = not is_dense_at(latent_frames, knobs)
    return sparse if knobs.rotate is None else bool(knobs.rotate) and sparse


def build_plan(
    latent_frames: int,
    patches_per_frame: int,
    knobs: PatternKnobs,
    *,
    text_tokens: int = 0,
    text_position: Literal["before", "after"] = "after",
    step: int = 0,
    dense: bool = False,
) -> SparsePlan:
    """The plan of a ``latent_frames x patches_per_frame`` video (pattern.md §3-4) at denoising ``step``;
    ``dense``: every frame attends every frame whatever the budget (a dense warm-up step or layer)."""
    T = latent_frames
    if not isinstance(T, int) or T < 1:
        raise GeometryError(f"latent_frames={T!r}: must be an integer >= 1")
    if not isinstance(patches_per_frame, int) or patches_per_frame < 1:
        raise GeometryError(f"patches_per_frame={patches_per_frame!r}: must be an integer >= 1")
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise GeometryError(f"text_tokens={text_tokens!r}: must be an integer >= 0")
    if text_position not in ("before", "after"):
        raise GeometryError(f"text_position={text_position!r}: must be 'before' or 'after'")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise GeometryError(f"step={step!r}: must be an integer >= 0")
    kfi = 1 if dense else choose_keyframe_interval(T, knobs)
    n_first = min(knobs.n_first, T)
    rotating = not dense and rotates(T, knobs)
    ring = T - n_first
    offset = step % ring if rotating and ring > 0 else 0
    globals_ = global_frames(T, n_first, kfi, offset)
    is_global = [False] * T
    for g in globals_:
        is_global[g] = True
    need = min(2 * knobs.window + 1, T - len(globals_))
    windows = tuple(local_window(f, T, knobs.window, is_global, need) for f in range(T))
    return SparsePlan(
        latent_frames=T,
        patches_per_frame=patches_per_frame,
        text_tokens=text_tokens,
        text_position=text_position,
        step=step,
        offset=offset,
        keyframe_interval=kfi,
        window=knobs.window,
        n_first=n_first,
        reference_latent_frames=knobs.reference_latent_frames,
        sparsity_scale=knobs.sparsity_scale,
        rotating=rotating,
        globals=globals_,
        windows=windows,
        temporal_patch=knobs.temporal_patch,
        forced_dense=dense,
    )
