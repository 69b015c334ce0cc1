"""Installing lvsa on diffusers pipelines and transformers: :func:`apply` and its undo, :func:`remove`.

``apply`` finds the adapter of each transformer (Wan 2.2 A14B pipelines hold two: ``transformer`` and
``transformer_2``, both get lvsa), fills the settings with the model's defaults, swaps the processors of
the self-attention layers (cross-attention stays dense) and hooks the transformers' forward to follow the
denoising step. Everything it changes is recorded on the returned :class:`LVSAHandle`, so ``remove``
restores the model exactly."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .. import log, registry
from ..errors import ConfigError
from ..geometry import LatentGrid, ModelFamily
from ..planning import check_declared_geometry, settings_for_model
from ..registry import Plugin
from . import compiled
from .base import ModelAdapter
from .layout import context_parallel_of
from .runtime import LVSARuntime, RuntimeStats

if TYPE_CHECKING:
    from ..attention import ContextParallel
    from ..plan import SparsePlan
    from ..settings import LVSASettings

_HANDLE_ATTRIBUTE = "_lvsa_handle"
#: where pipelines hold their transformers (Wan 2.2: two; MiniMax-H3's reference workflow: transformer_ref)
_TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2", "transformer_ref")


@dataclass
class LVSAHandle:
    """What :func:`apply` installed, and the runtime that its layers share."""

    runtime: LVSARuntime
    adapter: ModelAdapter
    transformers: list[Any]
    layers: dict[str, Any] = field(default_factory=dict)  # qualified name -> attention module
    #: where it was installed, for messages: "transformer, transformer_2 of WanPipeline"
    target: str = ""
    _originals: dict[str, Any] = field(default_factory=dict)
    _installed: dict[str, Any] = field(default_factory=dict)  # qualified name -> lvsa's processor
    _hooks: list[Any] = field(default_factory=list)

    @property
    def stats(self) -> RuntimeStats:
        return self.runtime.stats

    def replaced_layers(self) -> list[str]:
        """Layers whose processor is no longer lvsa's (``set_attn_processor`` and the like after apply)."""
        return [name for name, module in self.layers.items()
                if getattr(module, "processor", None) is not self._installed[name]]

    def plan_for_video(self, num_frames: int, height: int, width: int, step: int = 0) -> SparsePlan:
        """The plan the run will use for a ``num_frames x height x width`` video at denoising ``step``, without
        running it (previews, ``--show-mask``): the grid by the adapter's rule from the pipeline's VAE
        factors, planned by the runtime exactly as a forward of that size is. Raises
        :class:`~lvsa.errors.GeometryError` where the settings' geometry contradicts that grid."""
        runtime = self.runtime
        spatial = runtime.vae_spatial_factor
        grid = self.adapter.grid_of(self.transformers[0],
                                    runtime.family.latent_frames(num_frames, runtime.vae_temporal_factor),
                                    height // spatial, width // spatial)
        return runtime.plan_for(grid, step)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        kept = []
        for name, module in self.layers.items():
            release = getattr(self._installed[name], "release", None)
            if release is not None:  # a declared family's processor gives back its dispatch entry
                release()
            if getattr(module, "processor", None) is self._installed[name]:
                _set_processor(module, self._originals[name])
            else:
                kept.append(name)  # the user put another processor there since: theirs stays
        if kept:
            log.info(f"remove: {len(kept)} layers had another processor installed after apply and keep it "
                     f"({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})")
        self.layers.clear()
        self._installed.clear()
        for transformer in self.transformers:
            if getattr(transformer, _HANDLE_ATTRIBUTE, None) is self:
                delattr(transformer, _HANDLE_ATTRIBUTE)


def adapter_plugins() -> dict[str, Plugin[ModelAdapter]]:
    """Every registered model adapter (``lvsa.adapters`` entry points), loaded or not, by name."""
    return registry.plugins(registry.ADAPTERS_NAMESPACE, ModelAdapter)


@functools.cache
def declared_adapters() -> dict[str, ModelAdapter]:
    """The adapters of the families declared in :mod:`.families`, by name."""
    from ..families import DECLARED
    from .declared import DeclaredAdapter

    return {family.name: DeclaredAdapter(family) for family in DECLARED}


def adapters() -> dict[str, ModelAdapter]:
    """Every model adapter: the ``lvsa.adapters`` entry points, then the declared families."""
    found: dict[str, ModelAdapter] = {name: p.obj for name, p in adapter_plugins().items() if p.obj is not None}
    for name, adapter in declared_adapters().items():
        found.setdefault(name, adapter)
    return found


def adapter_for(transformer: Any) -> ModelAdapter:
    """The adapter of the most specific class of ``transformer`` that one handles (a subclass of a supported
    model runs as it, unless an adapter names the subclass); a refused class is an error with the reason."""
    from ..families import REFUSED

    everything = adapters().values()
    for cls in type(transformer).__mro__:
        for adapter in everything:
            if cls.__name__ in adapter.transformer_classes:
                return adapter
        for refusal in REFUSED:
            if cls.__name__ in refusal.classes:
                raise ConfigError(refusal.message(type(transformer).__name__))
    known = ", ".join(f"{a.name} ({'/'.join(a.transformer_classes)})" for a in everything)
    raise ConfigError(f"lvsa has no adapter for {type(transformer).__name__}; `lvsa models` lists the "
                      f"supported and refused classes. Adapters installed: {known or 'none'}")


def adapter_named(name: str) -> ModelAdapter:
    found = adapters().get(name)
    if found is None:
        raise ConfigError(f"unknown model adapter {name!r}; installed: {', '.join(adapters()) or 'none'}")
    return found


def _transformer_names(target: Any) -> list[str]:
    """The attributes of a pipeline that hold a transformer (``transformer``, ``transformer_2``, ...)."""
    return [name for name in _TRANSFORMER_ATTRIBUTES if getattr(target, name, None) is not None]


def transformers_of(target: Any) -> list[Any]:
    """The transformers of a pipeline (``transformer`` and ``transformer_2`` when present), or ``[target]``."""
    if hasattr(target, "components"):  # a DiffusionPipeline or a ModularPipeline
        found = [getattr(target, name) for name in _transformer_names(target)]
        if not found:
            raise ConfigError(f"{type(target).__name__} has no transformer to install lvsa on")
        return found
    return [target]


def apply(target: Any, settings: LVSASettings | None = None, *, sparse: bool = True) -> LVSAHandle:
    """Install lvsa on a diffusers pipeline or transformer; returns the handle (``handle.remove()`` undoes).

    ``settings`` defaults to :func:`lvsa.get_settings`; the model fills what it leaves unset (the reference
    horizon, the VAE's temporal factor). With ``sparse=False`` only the step tracking and RIFLEx (when
    ``settings.riflex``) are installed and attention stays the model's own."""
    from ..settings import get_settings

    transformers = [_unwrap_compiled(t) for t in transformers_of(target)]
    adapter = adapter_for(transformers[0])
    refused = getattr(getattr(adapter, "declaration", None), "refused_pipelines", {}).get(type(target).__name__)
    if refused:
        raise ConfigError(f"{type(target).__name__}: lvsa does not run this pipeline: {refused}")
    for other in transformers[1:]:
        if not adapter.handles(other):
            raise ConfigError(f"{type(other).__name__} and {type(transformers[0]).__name__} need different adapters")
    family = pipeline_family(target, adapter, transformers[0])
    settings = settings_for_model(settings if settings is not None else get_settings(), family)
    shared = _previous_handles(target, transformers, settings, sparse)
    if shared is not None:
        return shared
    check_declared_geometry(settings, _declared_geometry(target, transformers[0], adapter))
    runtime = LVSARuntime(settings, family, family.vae_temporal_factor, adapter.name, family.vae_spatial_factor)
    if hasattr(target, "components"):
        runtime.schedule.add(target)  # the pipeline's schedule gives the exact denoising step
    handle = LVSAHandle(runtime, adapter, transformers, target=_describe(target, transformers))

    def start_forward(module: Any, grid: LatentGrid, timestep: Any, parallel: ContextParallel | None) -> int:
        if handle.layers:
            replaced = handle.replaced_layers()
            if replaced:
                runtime.processors_replaced(replaced)
        return runtime.begin_forward(grid, timestep, parallel)

    def hook(index: int) -> Any:
        def before_forward(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            grid = adapter.grid_of_call(module, args, kwargs)  # shapes only: plain ints while dynamo traces
            timestep = adapter.step_timestep(module, args, kwargs)
            if not compiled.compiling():
                start_forward(module, grid, timestep, adapter.parallel_of_call(module, args, kwargs))
                return
            # traced by dynamo: the step's state changes behind the op, so the graph holds no guard on it
            if context_parallel_of(module) is not None and adapter.parallel_of_call(module, args, kwargs) is None:
                raise ConfigError(f"{type(module).__name__}: this forward runs whole on every rank under context "
                                  "parallelism, which lvsa does not trace into a compiled graph: compile its blocks "
                                  "instead (transformer.compile_repeated_blocks()), or run it uncompiled")
            calls = runtime.compiled
            compiled.forward_start(calls.ticket, grid.latent_frames, grid.patches_per_frame,
                                   compiled.as_tensor(timestep), calls.key, index)
            # what the rotary hook and the processors read while dynamo traces
            parallel = context_parallel_of(module)
            runtime.rope_grid, runtime.rope_shards = grid, parallel.degree if parallel else 1

        return before_forward

    layer_names: list[list[str]] = []  # per transformer, in the adapter's order (what dense layer indices count)
    names = _transformer_names(target) if len(transformers) > 1 else [""]
    try:
        for index, transformer in enumerate(transformers):
            prefix = names[index] + "." if names[index] else ""
            runtime.compiled.forward_callbacks.append(
                lambda grid, timestep, module=transformer: start_forward(module, grid, timestep,
                                                                         context_parallel_of(module)))
            handle._hooks.append(transformer.register_forward_pre_hook(hook(index), with_kwargs=True))
            if settings.riflex:
                handle._hooks.extend(adapter.install_riflex(transformer, runtime))
            if not sparse:
                continue
            layer_names.append([])
            for name, module in adapter.self_attention_layers(transformer).items():
                qualified = prefix + name
                layer_names[-1].append(qualified)
                handle._originals[qualified] = module.processor
                processor = adapter.make_processor(module.processor, runtime, qualified)
                _set_processor(module, processor)
                handle.layers[qualified] = module
                handle._installed[qualified] = processor
        runtime.dense_layers = runtime.dense.layer_names(layer_names, type(transformers[0]).__name__)
        for transformer in transformers:
            setattr(transformer, _HANDLE_ATTRIBUTE, handle)
    except Exception:
        handle.remove()
        raise
    what = f"{len(handle.layers)} self-attention layers" if sparse else "no attention layer (sparse=False)"
    extras = " + RIFLEx" if settings.riflex else ""
    log.info(f"installed on {what} of {', '.join(type(t).__name__ for t in transformers)}{extras} "
             f"(model {family.name}, reference_latent_frames={runtime.knobs.reference_latent_frames}, "
             f"backend={settings.backend})")
    if layer_names:
        line = runtime.dense.layers_line(len(layer_names[0]))
        if line:
            log.info(line.removeprefix("[LVSA] "))
    return handle


def _declared_geometry(target: Any, transformer: Any, adapter: ModelAdapter) -> dict[str, tuple[int | None, str]]:
    """The geometry factors the loaded model declares itself, and who declares each (for messages)."""
    pipeline = type(target).__name__
    return {
        "patch_size": (adapter.spatial_patch(transformer)[1], f"{type(transformer).__name__}'s config (patch_size)"),
        "vae_temporal_factor": (_pipeline_factor(target, "temporal")[0],
                                f"{pipeline}.{_pipeline_factor(target, 'temporal')[1]}"),
        "vae_spatial_factor": (_pipeline_factor(target, "spatial")[0],
                               f"{pipeline}.{_pipeline_factor(target, 'spatial')[1]}"),
    }


def pipeline_family(target: Any, adapter: ModelAdapter | None = None, transformer: Any = None) -> ModelFamily:
    """The model family of a pipeline (or a transformer) as it will run: its transformer's family, with the VAE
    factors the pipeline declares where it declares them (a small test VAE may compress less than the
    family's checkpoints)."""
    if transformer is None:
        transformer = _unwrap_compiled(transformers_of(target)[0])
    adapter = adapter or adapter_for(transformer)
    family = adapter.model_family(transformer)
    temporal, spatial = _pipeline_factor(target, "temporal")[0], _pipeline_factor(target, "spatial")[0]
    return replace(family, vae_temporal_factor=temporal or family.vae_temporal_factor,
                   vae_spatial_factor=spatial or family.vae_spatial_factor)


def _pipeline_factor(target: Any, axis: str) -> tuple[int | None, str]:
    """The VAE factor a pipeline declares along ``axis`` (``temporal`` or ``spatial``), and the attribute it
    comes from: ``vae_scale_factor_<axis>`` in most pipelines, ``vae_<axis>_compression_ratio`` in LTX's and
    EasyAnimate's, ``vae_<axis>_scale_factor`` in Mochi's."""
    for name in (f"vae_scale_factor_{axis}", f"vae_{axis}_compression_ratio", f"vae_{axis}_scale_factor"):
        value = getattr(target, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, name
    return None, f"vae_scale_factor_{axis}"


def _set_processor(module: Any, processor: Any) -> None:
    """Give an attention module a processor (Mochi's attention module has no ``set_processor``)."""
    setter = getattr(module, "set_processor", None)
    if setter is not None:
        setter(processor)
    else:
        module.processor = processor


def _describe(target: Any, transformers: list[Any]) -> str:
    if hasattr(target, "components"):
        return f"{', '.join(_transformer_names(target))} of {type(target).__name__}"
    return type(transformers[0]).__name__


def _unwrap_compiled(module: Any) -> Any:
    """The module inside ``torch.compile(module)``: lvsa installs on the model's own layers, which the
    compiled wrapper runs (compiling after apply, or applying after compiling, both end up the same)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if inner is not None and hasattr(module, "_orig_mod") else module


def _previous_handles(target: Any, transformers: list[Any], settings: Any, sparse: bool) -> LVSAHandle | None:
    """Resolve lvsa already installed on some of ``transformers``.

    A handle whose modules all belong to this target, and which serves no other pipeline, is replaced
    (re-applying with new settings). A handle that also owns modules outside this target (a transformer shared
    with another pipeline, such as Wan 2.2's ``transformer`` in a second pipeline), or that serves another
    pipeline on the same modules, is never cut in half nor changed behind that pipeline's back: with the same
    settings it is shared (returned, and this pipeline's schedule added to it), else this is an error naming
    the modules."""
    seen: list[LVSAHandle] = []
    for transformer in transformers:
        previous = getattr(transformer, _HANDLE_ATTRIBUTE, None)
        if previous is not None and not any(previous is h for h in seen):
            seen.append(previous)
    for previous in seen:
        outside = [t for t in previous.transformers if not any(t is mine for mine in transformers)]
        # another pipeline on the same transformers (a text-to-video and an image-to-video pipeline loaded on
        # one model): replacing its installation would change that pipeline's settings behind its back
        others = [p for p in previous.runtime.schedule.pipelines if p is not target] \
            if hasattr(target, "components") else []
        if not outside and not others:
            log.info(f"lvsa was already installed on {previous.target}: replacing it")
            previous.remove()
            continue
        inside_all = all(any(t is theirs for theirs in previous.transformers) for t in transformers)
        same = (previous.runtime.settings.model_dump() == settings.model_dump()
                and bool(previous.layers) == sparse)
        if inside_all and same and len(seen) == 1:
            if hasattr(target, "components"):
                previous.runtime.schedule.add(target)
            log.info(f"lvsa is already installed on {previous.target}, which shares "
                     f"{_describe(target, transformers)}: using the same installation")
            return previous
        names = ", ".join(type(t).__name__ for t in outside)
        consequence = (f"would leave {names} of the first installation without lvsa" if outside else
                       f"would change the settings of {', '.join(type(p).__name__ for p in others)} too")
        remedy = ("Remove it first (lvsa.remove on the first pipeline), then apply to each pipeline, or apply "
                  "with the same settings to share it" if outside else
                  "Apply with the same settings to share it, or remove it first (lvsa.remove on the first "
                  "pipeline, which then runs without lvsa)")
        raise ConfigError(
            f"lvsa is installed on {previous.target}, which shares modules with {_describe(target, transformers)}; "
            f"applying here {'with other settings ' if inside_all else ''}{consequence}. {remedy}"
        )
    return None


def remove(target: Any) -> bool:
    """Undo :func:`apply` on a pipeline or transformer; ``False`` when lvsa was not installed."""
    removed = False
    for transformer in map(_unwrap_compiled, transformers_of(target)):
        handle = getattr(transformer, _HANDLE_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
            removed = True
    return removed


def handle_of(target: Any) -> LVSAHandle | None:
    for transformer in map(_unwrap_compiled, transformers_of(target)):
        handle = getattr(transformer, _HANDLE_ATTRIBUTE, None)
        if handle is not None:
            return handle
    return None


__all__ = ["LVSAHandle", "ModelAdapter", "adapter_for", "adapter_named", "adapters", "apply", "handle_of",
           "pipeline_family", "remove", "transformers_of"]
