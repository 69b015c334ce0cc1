"""The model adapter contract: everything lvsa must know about one family of diffusers video transformers.

An adapter says which transformer classes it handles, where their self-attention layers are, how to read
the latent grid and the timestep off a forward call, how the family's RoPE is laid out (for RIFLEx), and
builds the processor that runs a layer through lvsa. (How to build a small random-weight pipeline of the
family for the example scripts is the application's business: ``lvsa_app.models``.) Adapters are found through the
``lvsa.adapters`` entry points, so a third-party package adds a model without touching lvsa; nothing here
imports diffusers until a model is in hand."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..geometry import ModelFamily
from ..ulysses import QKV
from .ops import DEFERRED, DeferredPlan, compiling

if TYPE_CHECKING:
    import torch

    from ..plan import SparsePlan
    from ..riflex import TemporalRope
    from .runtime import LVSARuntime



@dataclass(frozen=True)
class LatentGrid:
    """The transformer input of one forward, in patches: ``latent_frames x patches_per_frame`` tokens."""

    latent_frames: int
    patches_per_frame: int


class LVSAProcessor:
    """Base of the adapters' attention processors: the layer's name, the shared runtime, and the model's own
    processor, which runs whatever lvsa cannot plan (after a loud fallback).

    A processor asks :meth:`plan` first (``None``: call ``self.original``), projects, then :meth:`attend`.
    Under ``torch.compile`` the plan is :data:`~.ops.DEFERRED`: planning and the attention run inside the
    ``lvsa::attention`` op, which falls back to dense attention itself."""

    def __init__(self, original: Any, runtime: LVSARuntime, layer: str) -> None:
        self.original = original
        self.runtime = runtime
        self.layer = layer
        #: the layer's name as data for the op: a string constant would make every block's graph its own
        self.layer_key = runtime.layer_key(layer) if runtime is not None else None

    @property
    def text_position(self) -> Literal["before", "after"]:
        """Where the model puts its joint-attention text: the model table's word (one owner)."""
        return self.runtime.family.text_position or "after"

    def plan(self, video_tokens: int, text_tokens: int = 0) -> SparsePlan | DeferredPlan | None:
        """This step's plan for ``video_tokens`` (this rank's share under Ulysses) and ``text_tokens``."""
        if compiling():
            return DEFERRED
        runtime = self.runtime
        return runtime.plan_for(self.layer, runtime.video_tokens(video_tokens) + text_tokens, text_tokens=text_tokens,
                                text_position=self.text_position)

    def attend(self, video: QKV, text: QKV | None, plan: SparsePlan | DeferredPlan,
               key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The video (and text) outputs ``[B, S, H, D]`` of this layer under ``plan``."""
        return self.runtime.attention(video, text, plan, key_padding_mask, layer_key=self.layer_key,
                                      text_position=self.text_position)


def rewrite_rope_output(rope_module: Any, runtime: LVSARuntime, rope: TemporalRope) -> Any:
    """RIFLEx for a model whose rope module returns ``(cos, sin)``: rewrite them as they come out."""

    def rewrite(_module: Any, _args: Any, output: tuple[Any, Any]) -> Any:
        return runtime.riflex_tables(*output, rope)

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

    @abstractmethod
    def latent_grid(self, transformer: Any, hidden_states: torch.Tensor) -> LatentGrid:
        """Frames (token frames: latent frames over :meth:`temporal_patch`) and patches per frame of the
        transformer's ``hidden_states`` input."""

    @abstractmethod
    def make_processor(self, original: Any, runtime: LVSARuntime, layer: str) -> Any:
        """A processor that runs one self-attention layer through lvsa (``original`` serves fallbacks)."""

    #: position of ``hidden_states`` and ``timestep`` among the transformer's positional arguments
    forward_positions: ClassVar[dict[str, int]] = {"hidden_states": 0, "timestep": 1}

    def forward_argument(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = self.forward_positions[name]
        return args[index] if index < len(args) else None

    # -- context parallelism -----------------------------------------------------------------------
    def cp_plan(self, transformer: Any) -> dict[str, Any] | None:
        """diffusers' sharding plan for ``enable_parallelism``: ``None`` keeps the model's own ``_cp_plan``."""
        return None

    def check_context_parallel(self, transformer: Any, degree: int) -> None:
        from ..errors import ConfigError

        heads = transformer.config.num_attention_heads
        if heads % degree:
            raise ConfigError(f"{type(transformer).__name__} has {heads} attention heads, which do not split over "
                              f"ulysses_degree={degree}; use a degree that divides {heads}, and ring_degree for "
                              "the rest of the processes")
        if self.cp_plan(transformer) is None and getattr(transformer, "_cp_plan", None) is None:
            raise ConfigError(f"{type(transformer).__name__} has no context-parallel plan")

    # -- RIFLEx ------------------------------------------------------------------------------------
    @abstractmethod
    def temporal_rope(self, transformer: Any) -> TemporalRope | None:
        """The temporal RoPE layout, or ``None`` for a model without RoPE."""

    @abstractmethod
    def install_riflex(self, transformer: Any, runtime: LVSARuntime) -> list[Any]:
        """Hook RIFLEx into the model's rotary tables; returns the hook handles to remove on undo."""
