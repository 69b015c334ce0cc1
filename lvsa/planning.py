"""From settings to a plan: the settings' video-frame knobs become the planner's (:func:`knobs_from_settings`,
which reports what it rounds), and :func:`make_plan` plans one video. The planner itself
(:mod:`lvsa.plan`) takes plain values and says nothing; this module is where settings are read once and
the ``[LVSA]`` warnings about them are logged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from . import log
from .errors import ConfigError
from .geometry import ModelFamily, family, pick_factor
from .plan import PatternKnobs, SparsePlan, build_plan, resolve_knobs
from .settings import LVSASettings, get_settings


def settings_for_model(settings: LVSASettings, model: ModelFamily) -> LVSASettings:
    """``settings`` with the model's defaults filled in (its reference horizon). A horizon set by the user that
    differs from the model's is kept, with a warning naming both (every host applies lvsa the same way)."""
    chosen = settings.reference_latent_frames
    if chosen is not None and chosen != model.reference_latent_frames:
        log.logger.warning(
            "[LVSA] reference_latent_frames=%d (%s) differs from the model's %d (%s); keep it only if this "
            "checkpoint was trained on another length", settings.reference_latent_frames,
            settings.source_of("reference_latent_frames"), model.reference_latent_frames, model.name,
        )
    return settings.with_model_defaults(reference_latent_frames=model.reference_latent_frames)


def check_declared_geometry(settings: LVSASettings, declared: Mapping[str, tuple[int | None, str]]) -> None:
    """Geometry overrides against what the loaded model declares (``{field: (value, who declares it)}``, such
    as the pipeline's VAE factor): an override that contradicts it is an error naming both values (the run
    would plan with the one and compute with the other); one that agrees is said to be unneeded, once."""
    for field, (value, declarer) in declared.items():
        if value is None or getattr(settings, field) is None or settings.source_of(field) in ("default", "model"):
            continue
        if getattr(settings, field) != value:
            raise ConfigError(
                f"{settings.given_as(field)} contradicts {declarer}, which is {value}: unset it (with a loaded "
                "model lvsa reads the geometry off the pipeline and the transformer's input)")
        log.logger.warning("[LVSA] %s is not needed here: %s says the same (with a loaded model lvsa reads the "
                           "geometry off the pipeline and the transformer's input; the variable serves `lvsa "
                           "plan` without a model)", settings.given_as(field), declarer)


def knobs_from_settings(settings: LVSASettings, model: ModelFamily | None = None,
                        vae_temporal_factor: int | None = None) -> PatternKnobs:
    """The pattern's knobs in frames of the plan, filling the model's defaults. The VAE factor by
    :func:`~lvsa.geometry.pick_factor`: the setting, else ``vae_temporal_factor`` (what the caller knows, such
    as the pipeline's), else the model's (4 without a model). A window or keyframe spacing that is not a
    whole number of frames of the plan is rounded down, with a warning."""
    temporal_patch = model.temporal_patch if model else 1
    vae = pick_factor(settings, "vae_temporal_factor", vae_temporal_factor, model.vae_temporal_factor if model else 4)
    vt = vae * temporal_patch  # video frames per frame of the plan
    unit = "latent frame" if temporal_patch == 1 else f"token frame ({temporal_patch} latent frames)"
    if settings.window_size % vt and settings.source_of("window_size") != "default":
        log.logger.warning(
            "[LVSA] window_size=%d video frames is not a multiple of %d video frames per %s: using %d video "
            "frames (LVSA_WINDOW_SIZE, --window-size)", settings.window_size, vt, unit,
            settings.window_size // vt * vt)
    knobs = resolve_knobs(
        reference_latent_frames=settings.reference_latent_frames or (model.reference_latent_frames if model else None),
        sparsity_scale=settings.sparsity_scale,
        window_size=settings.window_size,
        n_first_frames=settings.n_first_frames,
        key_frame_interval=None if settings.auto_keyframes else settings.key_frame_interval,
        rotate=settings.rotate_keyframes,
        vae_temporal_factor=vae,
        temporal_patch=temporal_patch,
    )
    if not settings.auto_keyframes and settings.key_frame_interval % vt:
        log.logger.warning(
            "[LVSA] key_frame_interval=%d video frames is not a multiple of %d video frames per %s: "
            "using %d video frames", settings.key_frame_interval, vt, unit, knobs.key_frame_interval * vt)
    return knobs


def make_plan(
    latent_frames: int,
    patches_per_frame: int,
    *,
    text_tokens: int = 0,
    text_position: Literal["before", "after"] = "after",
    step: int = 0,
    settings: LVSASettings | None = None,
    model: str | ModelFamily | None = None,
    dense: bool = False,
) -> SparsePlan:
    """Plan the sparse pattern for ``latent_frames x patches_per_frame`` video tokens at denoising ``step``
    (``dense``: the plan of a dense warm-up step or dense layer, every frame attending every frame).

    ``settings`` defaults to :func:`lvsa.get_settings`; ``model`` (a family name such as ``"wan"``) fills
    knobs the settings leave unset, such as ``reference_latent_frames``."""
    settings = settings if settings is not None else get_settings()
    fam = family(model) if isinstance(model, str) else model
    knobs = knobs_from_settings(settings, fam)
    return build_plan(latent_frames, patches_per_frame, knobs, text_tokens=text_tokens, text_position=text_position,
                      step=step, dense=dense)
