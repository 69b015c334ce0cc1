"""Video geometry: from frames and pixels to latent frames ``T`` and tokens per latent frame ``P``.

Per-family factors live in :data:`FAMILIES`; the model adapters read the same factors off the model config
when a model is loaded, and the ``LVSA_*`` geometry overrides (settings) win over both. Pure Python.
The formulas are docs/pattern.md §1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import GeometryError

if TYPE_CHECKING:
    from .settings import LVSASettings

TextPosition = Literal["before", "after"]


@dataclass(frozen=True)
class LatentGrid:
    """A transformer input of one forward, in patches: ``latent_frames x patches_per_frame`` tokens (frames
    in the plan's unit: token frames, for a model that patches time)."""

    latent_frames: int
    patches_per_frame: int


@dataclass(frozen=True)
class ModelFamily:
    """What lvsa needs to know about a model family to plan without loading it."""

    name: str
    reference_latent_frames: int  # training horizon in latent frames
    vae_temporal_factor: int
    vae_spatial_factor: int
    patch_size: int  # spatial patch of the transformer
    text_position: TextPosition | None  # where joint-attention text tokens sit; None: self-attn is video only
    default_height: int
    default_width: int
    #: latent frames per token frame: the transformer's temporal patch (CogVideoX 1.5: 2). The plan's frames
    #: are token frames, the sequence's own unit; every frame count is converted through this factor.
    temporal_patch: int = 1
    #: a VAE that encodes fixed chunks, as (video frames, latent frames) per chunk (MiniMax-H3: 17 frames make
    #: 5 latent frames, and a video has 17n + 5 frames): frame counts follow :func:`latent_frames`' chunk rule,
    #: and ``vae_temporal_factor`` is the chunk's own rate (knobs given in video frames are converted at it)
    vae_chunk: tuple[int, int] | None = None

    @property
    def reference_video_frames(self) -> int:
        """The horizon in video frames: ``(T - 1) x vae_temporal_factor + 1``, or by the VAE's chunks."""
        if self.vae_chunk is not None:
            frames, latents = self.vae_chunk
            return (self.reference_latent_frames - 2) // latents * frames + latents
        return (self.reference_latent_frames - 1) * self.vae_temporal_factor + 1

    def latent_frames(self, num_frames: int, vae_temporal_factor: int | None = None) -> int:
        """The latent frames of a ``num_frames`` video (:func:`latent_frames` with the family's VAE)."""
        return latent_frames(num_frames, vae_temporal_factor or self.vae_temporal_factor, self.vae_chunk)

    def video_frames_per_plan_frame(self, vae_temporal_factor: int | None = None) -> int:
        """Video frames per frame of the plan (a token frame): VAE temporal factor x temporal patch."""
        return (vae_temporal_factor or self.vae_temporal_factor) * self.temporal_patch


FAMILIES: dict[str, ModelFamily] = {
    "wan": ModelFamily("wan", 21, 4, 8, 2, None, 480, 832),
    "wan-ti2v-5b": ModelFamily("wan-ti2v-5b", 31, 4, 16, 2, None, 704, 1280),
    "hunyuan": ModelFamily("hunyuan", 33, 4, 16, 1, "after", 480, 832),
    "cogvideox": ModelFamily("cogvideox", 13, 4, 8, 2, "before", 480, 720),
    # documented for 16N+1 frames, N <= 10: 161 frames = 41 latent frames (the pipeline pads to 42 = 21 token
    # frames), all within the horizon
    "cogvideox-1.5": ModelFamily("cogvideox-1.5", 41, 4, 8, 2, "before", 768, 1360, temporal_patch=2),
}


def family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise GeometryError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def latent_frames(num_frames: int, vae_temporal_factor: int, vae_chunk: tuple[int, int] | None = None) -> int:
    """``T = (F - 1) // vae_temporal + 1`` (the causal VAEs keep the first frame on its own). A chunked VAE
    (``vae_chunk`` = (C frames, L latent frames) per chunk) encodes ``C n + L`` frames (a count in between is
    rounded up to it, as its pipeline does) into ``L n + 2`` latent frames."""
    if num_frames < 1:
        raise GeometryError(f"num_frames={num_frames}: must be >= 1")
    if vae_chunk is not None:
        frames, latents = vae_chunk
        chunks = max(0, -(-(num_frames - latents) // frames))
        return chunks * latents + 2
    return (num_frames - 1) // vae_temporal_factor + 1


def video_frames_to_latent(count: int, vae_temporal_factor: int) -> int:
    """A count of video frames (window, leading frames, keyframe spacing) in latent frames, rounded down."""
    return count // vae_temporal_factor


def token_frames(latent_frames: int, temporal_patch: int) -> int:
    """Token frames of ``latent_frames`` under a temporal patch (the pipelines pad to a multiple of it)."""
    return -(-latent_frames // temporal_patch)


def patches_per_frame(height: int, width: int, vae_spatial_factor: int, patch_size: int) -> int:
    """``P = (height / vae_spatial / patch) * (width / vae_spatial / patch)``; sizes must divide exactly."""
    step = vae_spatial_factor * patch_size
    for label, size in (("height", height), ("width", width)):
        if size <= 0 or size % step:
            raise GeometryError(
                f"{label}={size} is not a positive multiple of vae_spatial_factor*patch_size={step}; "
                f"pick a multiple of {step} or set LVSA_PATCHES_PER_FRAME"
            )
    return (height // step) * (width // step)


@dataclass(frozen=True)
class VideoGeometry:
    latent_frames: int
    patches_per_frame: int
    vae_temporal_factor: int
    temporal_patch: int = 1

    @property
    def token_frames(self) -> int:
        """The frames of the plan: latent frames grouped by the transformer's temporal patch."""
        return token_frames(self.latent_frames, self.temporal_patch)


def pick_factor(settings: LVSASettings, field: str, *candidates: int | None) -> int:
    """pattern.md §1. The precedence of every geometry factor, in one place: the ``LVSA_*`` override when set, else the
    first known candidate (what the call or the pipeline knows, then the model family's). A factor known
    from none of them is an error, never a guess."""
    for candidate in (getattr(settings, field), *candidates):
        if candidate is not None:
            return candidate
    raise GeometryError(
        f"{field} is unknown: pass a model family (--model) or set LVSA_{field.upper()} "
        f"(flag --{field.replace('_', '-')})"
    )


def planned_patches_per_frame(
    settings: LVSASettings, model: ModelFamily | None = None, height: int | None = None, width: int | None = None
) -> int:
    """pattern.md §1, the one owner of tokens per frame: ``LVSA_PATCHES_PER_FRAME`` when set, else computed
    from the height and width, each factor by :func:`pick_factor` (override, then the call, then the family)."""
    if settings.patches_per_frame is not None:
        return settings.patches_per_frame
    return patches_per_frame(
        pick_factor(settings, "video_height", height, model.default_height if model else None),
        pick_factor(settings, "video_width", width, model.default_width if model else None),
        pick_factor(settings, "vae_spatial_factor", model.vae_spatial_factor if model else None),
        pick_factor(settings, "patch_size", model.patch_size if model else None),
    )


def resolve_video_geometry(
    num_frames: int,
    settings: LVSASettings,
    model: ModelFamily | None = None,
    height: int | None = None,
    width: int | None = None,
) -> VideoGeometry:
    """Latent geometry of a ``num_frames x height x width`` video.

    Each factor comes from the ``LVSA_*`` override when set, else from the call (``height``/``width``), else
    from the model family; a factor known from none of them is an error, never a guess."""

    def pick(field: str, *candidates: int | None) -> int:
        return pick_factor(settings, field, *candidates)

    vt = pick("vae_temporal_factor", model.vae_temporal_factor if model else None)
    ppf = planned_patches_per_frame(settings, model, height, width)
    return VideoGeometry(latent_frames(num_frames, vt, model.vae_chunk if model else None), ppf, vt,
                         model.temporal_patch if model else 1)
