"""The model adapter contract: everything lvsa must know about one family of diffusers video transformers.

An adapter says which transformer classes it handles, where their self-attention layers are, how to read
the latent grid and the timestep off a forward call, how the family's RoPE is laid out (for RIFLEx), and
builds the processor that runs a layer through lvsa. (How to build a small random-weight pipeline of the
family for the example scripts is the application's business: ``lvsa_app.models``.) Adapters are found through the
``lvsa.adapters`` entry points, so a third-party package adds a model without touching lvsa; nothing here
imports diffusers until a model is in hand."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from ..attention import execute
from ..errors import ConfigError, GeometryError
from ..geometry import LatentGrid, ModelFamily, token_frames
from ..riflex import rewrite_tables
from ..ulysses import QKV
from . import compiled
from .compiled import DEFERRED, DeferredPlan, compiling
from .layout import context_parallel_of

if TYPE_CHECKING:
    import torch

    from ..attention import ContextParallel, FrameReferences
    from ..plan import SparsePlan
    from ..riflex import TemporalRope
    from .runtime import LVSARuntime

__all__ = ["LVSAProcessor", "LatentGrid", "ModelAdapter", "rewrite_rope_output", "riflex_tables"]


#: what diffusers sets on a layer's processor after it is built (``set_attention_backend``, ``enable_parallelism``):
#: it belongs to the model's own processor, which lvsa keeps and runs for fallbacks, so lvsa's processor passes
#: it through; a choice made while lvsa is installed then survives ``lvsa.remove``
_MODEL_PROCESSOR_ATTRIBUTES = frozenset({"_attention_backend", "_parallel_config"})


class LVSAProcessor:
    """Base of the adapters' attention processors: the layer's name, the shared runtime, and the model's own
    processor, which runs whatever lvsa cannot plan (after a loud fallback).

    A processor asks :meth:`plan` first (``None``: call ``self.original``), projects, then :meth:`attend`,
    which hands the call to the executor (:func:`lvsa.attention.execute`) with the forward's context. Under
    ``torch.compile`` the plan is :data:`~.compiled.DEFERRED`: the ``lvsa::attention`` op calls the executor,
    which plans there and falls back to dense attention itself."""

    def __init__(self, original: Any, runtime: LVSARuntime, layer: str) -> None:
        self.original = original
        self.runtime = runtime
        self.layer = layer
        #: the layer's name as data for the op: a string constant would make every block's graph its own
        self.layer_key = runtime.compiled.layer_key(layer) if runtime is not None else None

    def __getattr__(self, name: str) -> Any:
        if name in _MODEL_PROCESSOR_ATTRIBUTES:
            original = self.__dict__.get("original")
            if original is not None and hasattr(original, name):
                return getattr(original, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODEL_PROCESSOR_ATTRIBUTES and hasattr(self.__dict__.get("original"), name):
            setattr(self.original, name, value)
            return
        super().__setattr__(name, value)

    def plan(self, video_tokens: int, text_tokens: int = 0) -> SparsePlan | DeferredPlan | None:
        """This step's plan for ``video_tokens`` (this rank's share under Ulysses) and ``text_tokens``."""
        if compiling():
            return DEFERRED
        context = self.runtime.context
        return context.plan(self.layer, context.video_tokens(video_tokens) + text_tokens, text_tokens)

    def unsupported(self, reason: str, video_tokens: int, detail: str, text_tokens: int = 0) -> None:
        """A call this layer cannot plan (inputs lvsa does not handle): the policy's error or loud line."""
        context = self.runtime.context
        context.unsupported(self.layer, reason, context.video_tokens(video_tokens) + text_tokens, detail)

    def attend(self, video: QKV, text: QKV | None, plan: SparsePlan | DeferredPlan,
               key_padding_mask: torch.Tensor | None = None,
               references: FrameReferences | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The video (and text) outputs ``[B, S, H, D]`` of this layer under ``plan`` (with frame-paired
        ``references``: eagerly only)."""
        if isinstance(plan, DeferredPlan):
            if references is not None:
                raise GeometryError(f"{self.layer}: frame-paired reference keys do not run inside a compiled graph")
            text_q, text_k, text_v = text if text is not None else (None, None, None)
            calls = self.runtime.compiled
            video_out, text_out = compiled.attention(calls.ticket, self.layer_key, *video, text_q, text_k, text_v,
                                                     key_padding_mask, calls.key)
            return video_out, (text_out if text is not None else None)
        return execute(self.runtime.context, self.layer, video, text, key_padding_mask, plan, references)


def riflex_tables(runtime: LVSARuntime, cos: torch.Tensor, sin: torch.Tensor, rope: TemporalRope) -> tuple[Any, Any]:
    """RIFLEx on a model's rotary tables for the forward's grid (this rank's rows under sequence parallelism);
    ``s`` is the setting, else the extension ratio (at least 1)."""
    grid = runtime.rope_grid
    if grid is None:
        raise GeometryError("RIFLEx: the rotary tables were built before the transformer's forward hook ran")
    reference = runtime.knobs.reference_frames
    s = runtime.settings.riflex_s if runtime.settings.riflex_s is not None else max(1.0, grid.latent_frames / reference)
    total = grid.latent_frames * grid.patches_per_frame
    rows = cos.numel() // cos.shape[-1]
    offset = 0
    parallel = runtime.context.parallel
    if rows != total and parallel is not None and rows * parallel.degree == total:
        offset = parallel.shard_index * rows  # this rank's sequence shard of the table
    return rewrite_tables(cos, sin, grid.latent_frames, rope, reference, s, total_tokens=total, token_offset=offset)


def rewrite_rope_output(rope_module: Any, runtime: LVSARuntime, rope: TemporalRope) -> Any:
    """RIFLEx for a model whose rope module returns ``(cos, sin)``: rewrite them as they come out."""

    def rewrite(_module: Any, _args: Any, output: tuple[Any, Any]) -> Any:
        return riflex_tables(runtime, *output, rope)

    return rope_module.register_forward_hook(rewrite)


class ModelAdapter(ABC):
    name: ClassVar[str]
    #: class names (diffusers' or subclasses') of the transformers this adapter handles
    transformer_classes: ClassVar[tuple[str, ...]]

    def handles(self, transformer: Any) -> bool:
        return any(cls.__name__ in self.transformer_classes for cls in type(transformer).__mro__)

    # -- the model ---------------------------------------------------------------------------------
    @abstractmethod
    def family(self, transformer: Any) -> ModelFamily:
        """The family defaults (reference horizon, VAE factors) that fit this transformer's config."""

    def family_defaults(self) -> ModelFamily:
        """The family of this adapter's default checkpoint, for checks made before a model is loaded."""
        from ..geometry import FAMILIES

        return FAMILIES[self.name]

    def temporal_patch(self, transformer: Any) -> int:
        """Latent frames per token frame, read off the config (``patch_size_t``, or the first entry of a 3-d
        ``patch_size``): the one source of the frame unit, so a model that patches time is planned in token
        frames without a special case. :meth:`latent_grid` must count frames in the same unit."""
        config = transformer.config
        value = getattr(config, "patch_size_t", None)
        if value is None:
            patch = getattr(config, "patch_size", None)
            value = patch[0] if isinstance(patch, (tuple, list)) and len(patch) == 3 else 1
        return int(value)

    def model_family(self, transformer: Any) -> ModelFamily:
        """:meth:`family` with the transformer's own temporal patch."""
        found = self.family(transformer)
        patch = self.temporal_patch(transformer)
        return found if found.temporal_patch == patch else replace(found, temporal_patch=patch)

    @abstractmethod
    def self_attention_layers(self, transformer: Any) -> dict[str, Any]:
        """``{qualified name: attention module}`` of every self-attention layer (cross-attention excluded)."""

    def spatial_patch(self, transformer: Any) -> tuple[int, int]:
        """The transformer's patch over latent height and width, read off the config (``patch_size``: an int,
        or the last two entries of a 3-d patch)."""
        patch = transformer.config.patch_size
        if isinstance(patch, (tuple, list)):
            return int(patch[-2]), int(patch[-1])
        return int(patch), int(patch)

    def grid_of(self, transformer: Any, latent_frames: int, latent_height: int, latent_width: int) -> LatentGrid:
        """The grid of the plan for a latent of this size: token frames (latent frames over
        :meth:`temporal_patch`, padded up as the pipelines pad) and patches per frame. The one rule for
        the run (:meth:`latent_grid`) and for a preview (:meth:`LVSAHandle.plan_for_video`)."""
        p_h, p_w = self.spatial_patch(transformer)
        return LatentGrid(token_frames(latent_frames, self.temporal_patch(transformer)),
                          (latent_height // p_h) * (latent_width // p_w))

    #: where frames, height and width sit in the transformer's ``hidden_states`` ([B, C, F, H, W] by default)
    latent_axes: ClassVar[tuple[int, int, int]] = (2, 3, 4)

    def latent_grid(self, transformer: Any, hidden_states: torch.Tensor) -> LatentGrid:
        """The grid of the transformer's ``hidden_states`` input (:meth:`grid_of` its latent size)."""
        frames, height, width = (hidden_states.shape[axis] for axis in self.latent_axes)
        return self.grid_of(transformer, frames, height, width)

    def grid_of_call(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> LatentGrid:
        """The grid of a forward call (its ``hidden_states`` by default)."""
        return self.latent_grid(transformer, self.forward_argument(transformer, "hidden_states", args, kwargs))

    def step_timestep(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """What tells the denoising step of a forward call (:mod:`lvsa.steps`): its ``timestep``, which falls
        over the loop."""
        return self.forward_argument(transformer, "timestep", args, kwargs)

    @abstractmethod
    def make_processor(self, original: Any, runtime: LVSARuntime, layer: str) -> Any:
        """A processor that runs one self-attention layer through lvsa (``original`` serves fallbacks)."""

    #: position of ``hidden_states`` and ``timestep`` among the transformer's positional arguments
    forward_positions: ClassVar[dict[str, int]] = {"hidden_states": 0, "timestep": 1}

    def forward_argument(self, transformer: Any, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Argument ``name`` of a call of ``transformer``'s forward (``None`` when not given)."""
        if name in kwargs:
            return kwargs[name]
        index = self.forward_positions[name]
        return args[index] if index < len(args) else None

    # -- context parallelism -----------------------------------------------------------------------
    def cp_plan(self, transformer: Any) -> dict[str, Any] | None:
        """diffusers' sharding plan for ``enable_parallelism``: ``None`` keeps the model's own ``_cp_plan``."""
        return None

    def attention_heads(self, transformer: Any) -> int:
        """The heads of the video self-attention: the config's ``num_attention_heads``, or (for a model whose
        config counts them otherwise, such as Kandinsky 5's ``model_dim / head_dim``) its first layer's."""
        heads = getattr(transformer.config, "num_attention_heads", None)
        if heads is None:
            layer = next(iter(self.self_attention_layers(transformer).values()))
            heads = getattr(layer, "heads", None) or layer.num_heads
        return int(heads)

    def check_context_parallel(self, transformer: Any, degree: int) -> None:
        heads = self.attention_heads(transformer)
        if heads % degree:
            raise ConfigError(f"{type(transformer).__name__} has {heads} attention heads, which do not split over "
                              f"ulysses_degree={degree}; use a degree that divides {heads}, and ring_degree for "
                              "the rest of the processes")
        if self.cp_plan(transformer) is None and getattr(transformer, "_cp_plan", None) is None:
            raise ConfigError(f"{type(transformer).__name__} has no context-parallel plan")

    def finish_context_parallel(self, transformer: Any) -> None:
        """After diffusers' ``enable_parallelism``: what the adapter's sharding plan needs of the model beyond
        diffusers' hooks (nothing by default)."""
        return None

    def parallel_of_call(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> ContextParallel | None:
        """The context-parallel layout this forward runs under: the transformer's, or ``None`` for a forward
        that runs whole on every rank."""
        return context_parallel_of(transformer)

    def check_ring(self, transformer: Any, degree: int) -> None:
        """Refuse ring attention over ``degree`` ranks where the family does not run it (every family with an
        adapter module does)."""
        return None

    # -- RIFLEx ------------------------------------------------------------------------------------
    @abstractmethod
    def temporal_rope(self, transformer: Any) -> TemporalRope | None:
        """The temporal RoPE layout, or ``None`` for a model without RoPE."""

    @abstractmethod
    def install_riflex(self, transformer: Any, runtime: LVSARuntime) -> list[Any]:
        """Hook RIFLEx into the model's rotary tables; returns the hook handles to remove on undo."""
