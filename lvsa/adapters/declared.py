"""The one adapter that runs every declared model family (:class:`lvsa.families.Family`: what lvsa must know
of a diffusers video transformer, written as data): :class:`DeclaredAdapter`.

lvsa takes over a declared family's self-attention where every diffusers attention processor ends: its call of
``dispatch_attention_fn``, after the model's own projections, norms and RoPE. Each self-attention layer gets a
:class:`DispatchProcessor`, which runs the model's own processor code with that one name bound to the layer's
entry (the processor's function over a copy of its module's globals: diffusers' module, the cross-attention
and every other model stay untouched). There lvsa cuts the joined sequence into video and text where the
family declares it, plans, and hands the call to the executor; a call it cannot plan goes to diffusers'
own ``dispatch_attention_fn`` with the same arguments after the policy's loud line. So a family is a grid
rule, the names of its self-attention layers, where its other tokens sit, and its horizons.

(Registering lvsa as a diffusers attention backend by name would need diffusers' private backend registry,
and a backend cannot tell a video self-attention call from the cross-attention of the same model: the
per-layer binding can.)"""

from __future__ import annotations

import inspect
import itertools
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..attention import FrameReferences
from ..errors import ConfigError
from ..families import Family, Variant
from ..geometry import LatentGrid, ModelFamily
from ..plan import is_dense_at
from .base import LVSAProcessor, ModelAdapter
from .compiled import compiling
from .layout import context_parallel_of

if TYPE_CHECKING:
    from ..attention import ContextParallel
    from ..riflex import TemporalRope
    from .runtime import LVSARuntime

__all__ = ["DeclaredAdapter", "DispatchProcessor"]

_DISPATCH = "dispatch_attention_fn"
_SDPA = "F.scaled_dot_product_attention"


# -- the processor ------------------------------------------------------------------------------------
_processor_classes: dict[type, type] = {}


def processor_for(original: Any, runtime: LVSARuntime, layer: str, family: Family) -> DispatchProcessor:
    """lvsa's processor for a layer whose model processor is ``original``: a subclass per processor class,
    whose ``__call__`` shows the original's signature (diffusers' attention modules drop the keyword
    arguments a processor's signature does not name)."""
    cls = type(original)
    found = _processor_classes.get(cls)
    if found is None:
        call = cls.__call__

        def __call__(self: DispatchProcessor, attn: Any, *args: Any, **kwargs: Any) -> Any:
            return self.run(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(call)  # type: ignore[attr-defined]
        found = type(f"LVSA{cls.__name__}", (DispatchProcessor,), {"__call__": __call__,
                                                                   "__module__": __name__})
        _processor_classes[cls] = found
    return found(original, runtime, layer, family)


class DispatchProcessor(LVSAProcessor):
    """Runs the model's own processor code with its attention call bound to this layer's entry: diffusers'
    ``dispatch_attention_fn`` (:meth:`dispatch`, ``[B, S, H, D]``) or, for processors that call torch
    themselves, ``F.scaled_dot_product_attention`` (:meth:`sdpa`, ``[B, H, S, D]``)."""

    def __init__(self, original: Any, runtime: LVSARuntime, layer: str, family: Family) -> None:
        super().__init__(original, runtime, layer)
        self.family = family
        self._call, self._namespaces = _bind(type(original).__call__, family.attention_call, self, layer)
        self._dispatched = 0  # calls that reached the entry (checked after each eager call)
        self._signature = inspect.signature(type(original).__call__)  # read once, not per layer call

    def run(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        if compiling():
            if self.family.eager_under_compile:
                if self.family.reference_keys != "none" and self._dense_at_every_step():
                    # within the horizon lvsa leaves the model as it is: its own attention stays in the graph
                    return self.original(attn, *args, **kwargs)
                return _outside_the_graph(self, attn, *args, **kwargs)
            return self._call(self.original, attn, *args, **kwargs)
        return self._run_eager(attn, *args, **kwargs)

    def _run_eager(self, attn: Any, *args: Any, **kwargs: Any) -> Any:
        before = self._dispatched
        if self.family.reference_keys != "none":
            self._arguments = self._bound(attn, args, kwargs)
        out = self._call(self.original, attn, *args, **kwargs)
        if self._dispatched == before and not self._skipped_by_design(attn, args, kwargs):
            # the processor attended some other way (a helper, another kernel): lvsa did not run
            self.runtime.context.fallback.fall_back(
                self.layer, "not_dispatched", f"{type(self.original).__name__} returned without calling "
                f"{self.family.attention_call}, so this layer ran without lvsa", "Report the processor class; "
                "lvsa.remove() runs the model as it is", error=ConfigError, once=self.layer)
        return out

    def _dense_at_every_step(self) -> bool:
        """Whether every step's plan of this forward's grid covers every frame (the grid is within the horizon)."""
        grid = self.runtime.rope_grid
        return grid is not None and is_dense_at(grid.latent_frames, self.runtime.knobs)

    def _skipped_by_design(self, attn: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether the call asked the model's processor to skip attention (:attr:`Family.skip_arguments`)."""
        if not self.family.skip_arguments:
            return False
        arguments = self._bound(attn, args, kwargs)
        return any(bool(arguments.get(name)) for name in self.family.skip_arguments)

    def _bound(self, attn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model processor's arguments of this call, by name."""
        return self._signature.bind_partial(self.original, attn, *args, **kwargs).arguments

    def release(self) -> None:
        """Forget the layer's namespaces (on ``remove``)."""
        for name in self._namespaces:
            sys.modules.pop(name, None)

    def dispatch(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                 scale: float | None = None, enable_gqa: bool = False, attention_kwargs: dict[str, Any] | None = None,
                 *, backend: Any = None, parallel_config: Any = None) -> torch.Tensor:
        """The layer's attention ``[B, S, H, D]`` (diffusers' ``dispatch_attention_fn`` contract); a call lvsa
        cannot run goes to diffusers' own, with the same arguments."""
        if self.family.reference_keys == "packed_by_frame" and _is_block_mask(attn_mask):
            out = self._with_references(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        else:
            out = self._lvsa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is None:
            # lvsa's context says whether this forward is split (a forward that runs whole on every rank, such as
            # WanAnimate2's reference pass, still carries the processor's parallel config)
            parallel_config = parallel_config if self.runtime.context.parallel is not None else None
            out = _diffusers_dispatch()(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                        attention_kwargs, backend=backend, parallel_config=parallel_config)
        return out

    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        """The layer's attention ``[B, H, S, D]`` (``F.scaled_dot_product_attention``'s contract)."""
        out = self._lvsa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, dropout_p,
                         is_causal, scale, enable_gqa)
        if out is None:
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    def _lvsa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor | None:
        """lvsa's output ``[B, S, H, D]`` for the joined sequence, or ``None`` after the policy's loud line (the
        caller then runs the model's own attention)."""
        if not compiling():  # a counter in a compiled graph would be a guard
            self._dispatched += 1
        video_tokens = self._video_tokens(query.shape[1])
        other = query.shape[1] - video_tokens
        problem = self._problem(query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa, other)
        plan = None
        if problem is None:
            plan = self.plan(video_tokens, other)
        else:
            self.unsupported(problem[0], video_tokens, problem[1], max(other, 0))
        if plan is None:
            return None
        before = self.family.other_tokens == "before"
        if not other:
            out, _ = self.attend((query, key, value), None, plan)
            return out
        cut = other if before else video_tokens
        first = (query[:, :cut], key[:, :cut], value[:, :cut])
        second = (query[:, cut:], key[:, cut:], value[:, cut:])
        video, text = (second, first) if before else (first, second)
        padding = None
        if attn_mask is not None:
            # the text's columns sit at the mask's same end whether it spans this rank's video shard or (under
            # context parallelism, built before the sequence is split) the whole video
            keys = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1])
            keys = keys[:, :other] if before else keys[:, -other:]
            padding = keys if keys.dtype == torch.bool else keys == 0
        video_out, text_out = self.attend(video, text, plan, padding)
        return torch.cat([text_out, video_out] if before else [video_out, text_out], dim=1)

    def _with_references(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
                         dropout_p: float, is_causal: bool, scale: float | None,
                         enable_gqa: bool) -> torch.Tensor | None:
        """A generation pass's packed ``[video | cached reference]`` call (:attr:`Family.reference_keys`
        ``packed_by_frame``): lvsa's output in the packed layout, or ``None`` for the model's own attention
        (a plan that is dense, or a call the policy let fall back)."""
        self._dispatched += 1
        arguments = getattr(self, "_arguments", {})
        parallel = self.runtime.context.parallel
        layout = packed_references(self.layer, arguments, query, key, block_mask, parallel.degree if parallel else 1)
        video_tokens = layout.frames * layout.tokens
        problem = self._problem(query[:, :video_tokens], key[:, :video_tokens], None, dropout_p, is_causal, scale,
                                enable_gqa, 0)
        if problem is not None:
            self.unsupported(problem[0], video_tokens, problem[1])
            return None
        plan = self.plan(video_tokens)
        if plan is None or (plan.is_dense and parallel is None):  # the model's flex attention sees no other rank
            return None
        start = layout.reference_start
        reference_rows = slice(start, start + layout.reference_frames * layout.tokens)
        references = FrameReferences(key[:, reference_rows], value[:, reference_rows], layout.reference_frames,
                                     first=1)
        video = (query[:, :video_tokens], key[:, :video_tokens], value[:, :video_tokens])
        out, _ = self.attend(video, None, plan, references=references)
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, query.shape[1] - video_tokens))

    def _video_tokens(self, seq_len: int) -> int:
        """The video tokens of this layer's sequence: from the forward's grid, which the pre-hook sets before
        any layer runs (while dynamo traces too, where the context of the forward is built only at run time)."""
        grid = self.runtime.rope_grid
        if grid is None:
            return seq_len
        if compiling():
            return grid.latent_frames * grid.patches_per_frame // self.runtime.rope_shards
        parallel = self.runtime.context.parallel
        if parallel is not None and not self.family.context_parallel:
            raise ConfigError(f"{self.layer}: lvsa's context parallelism is not declared for {self.family.name}: "
                              f"{self.family.no_context_parallel}; run it in one process")
        return grid.latent_frames * grid.patches_per_frame // (parallel.degree if parallel else 1)

    def _problem(self, query: Any, key: Any, attn_mask: Any, dropout_p: float, is_causal: bool, scale: float | None,
                 enable_gqa: bool, other: int) -> tuple[str, str] | None:
        """Why lvsa cannot run this call as the model asked, or ``None``."""
        family = self.family
        if other < 0 or (other and family.other_tokens == "none"):
            why = f" ({family.unplanned_tokens})" if family.unplanned_tokens else ""
            return ("geometry_detect", f"the sequence has {query.shape[1]} tokens, the grid "
                    f"{query.shape[1] - other} video tokens, and {family.name} declares no other tokens{why}")
        if dropout_p or is_causal:
            return ("unexpected_inputs", f"dropout_p={dropout_p} is_causal={is_causal}")
        if key.shape[2] != query.shape[2] or enable_gqa:
            return ("unexpected_inputs", f"{query.shape[2]} query heads but {key.shape[2]} key heads")
        if scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12 * scale:
            return ("unexpected_inputs", f"softmax scale {scale} is not 1/sqrt(head_dim)")
        if attn_mask is not None:
            shape = tuple(attn_mask.shape)
            grid = self.runtime.rope_grid
            whole = other + grid.latent_frames * grid.patches_per_frame if grid is not None else query.shape[1]
            key_mask = (len(shape) in (2, 4) and shape[-1] in (query.shape[1], whole)
                        and all(s == 1 for s in shape[1:-1]))
            if family.mask != "key_padding" or not key_mask:
                return ("attention_mask", f"{family.name} passed an attention mask of shape {shape}, which lvsa "
                        "does not apply" + ("" if family.mask == "key_padding" else
                                            " (the family declares none)"))
        return None


@dataclass(frozen=True)
class PackedReferences:
    """Where a packed ``[video | cached reference]`` call holds what (WanAnimate2's generation pass): ``frames``
    video frames of ``tokens`` tokens from row 0 (this rank's shard under context parallelism), then from
    ``reference_start`` ``reference_frames`` frames of cached reference keys of the same size (every rank's
    whole); frame ``f`` of the whole video attends reference frame ``f - 1``."""

    frames: int
    tokens: int
    reference_start: int
    reference_frames: int


def packed_references(layer: str, arguments: dict[str, Any], query: torch.Tensor, key: torch.Tensor,
                      block_mask: Any, shards: int = 1) -> PackedReferences:
    """The layout of a generation pass's packed call, read off its processor's arguments and checked against the
    tensors and the model's BlockMask: a layout lvsa would not attend exactly as the mask does is refused.
    Under context parallelism over ``shards`` ranks the grid is this rank's (:class:`_FrameGrid`)."""
    names = ("grid_sizes", "reference_grid_sizes", "origin_latent_frames", "origin_latent_hw")
    missing = [name for name in names if arguments.get(name) is None]
    if missing:
        raise ConfigError(f"{layer}: its packed reference call came without {', '.join(missing)}, which give lvsa "
                          "the layout of the video and the cached reference rows")
    grid = [tuple(row) for row in arguments["grid_sizes"].tolist()]
    reference = [tuple(row) for row in arguments["reference_grid_sizes"].tolist()]
    origin_frames, origin_tokens = int(arguments["origin_latent_frames"]), int(arguments["origin_latent_hw"])
    (frames, height, width), (ref_frames, ref_height, ref_width) = grid[0], reference[0]
    video_rows = -(-(origin_frames + 1) * origin_tokens // 128) * 128  # both parts padded to 128 rows
    reference_rows = -(-origin_frames * origin_tokens // 128) * 128
    problem = None
    if len(set(grid)) != 1 or len(set(reference)) != 1:
        problem = f"its samples have different grids ({grid}, references {reference})"
    elif height * width != origin_tokens or ref_height * ref_width != origin_tokens:
        problem = (f"a segment of {height}x{width} tokens per frame (references {ref_height}x{ref_width}) in a "
                   f"layout of {origin_tokens}: the model would attend the zero rows between them")
    elif frames * shards != origin_frames + 1 or ref_frames != origin_frames:
        problem = (f"{frames * shards} video frames and {ref_frames} reference frames in a layout of "
                   f"{origin_frames} + 1: the model would attend zero rows")
    elif query.shape[1] != video_rows or key.shape[1] != video_rows + reference_rows:
        problem = f"{query.shape[1]} query and {key.shape[1]} key rows for {video_rows} and {reference_rows}"
    elif tuple(block_mask.shape[-2:]) != (video_rows, video_rows + reference_rows):
        problem = f"a BlockMask of shape {tuple(block_mask.shape)} for {video_rows} and {reference_rows} rows"
    if problem is not None:
        raise ConfigError(f"{layer}: lvsa runs the packed reference layout that WanAnimate2's pipeline builds, not "
                          f"{problem}; run segments of the pipeline's own size")
    return PackedReferences(frames, origin_tokens, video_rows, ref_frames)


def _lvsa_split(value: Any) -> bool:
    """Whether a :attr:`Family.cp_plan` entry is one lvsa applies itself (all but ``split`` and ``gather``)."""
    return isinstance(value, tuple) and (value[0] in _MODULE_KINDS or value[0] in _ARGUMENT_KINDS)


def _last_module(transformer: Any, module: str) -> str:
    """``blocks.-1`` (a :attr:`Family.cp_plan` name): the list's last module, as diffusers names it."""
    if not module.endswith(".-1"):
        return module
    parent = module[:-3]
    return f"{parent}.{len(transformer.get_submodule(parent)) - 1}"


def _shard(table: torch.Tensor, dim: int, dims: int, parallel: Any, what: str) -> torch.Tensor:
    """This rank's shard of ``table``, cut as diffusers cuts its own inputs: equal chunks, in the order of its
    flattened ``("ring", "ulysses")`` mesh."""
    degree = parallel.degree
    if table.dim() != dims or table.shape[dim] % degree:
        raise ConfigError(f"{what} of shape {tuple(table.shape)} does not split into {degree} equal shards along "
                          f"dimension {dim}")
    return table.chunk(degree, dim)[parallel.shard_index]


class _WholeForwards:
    """A pre-hook on the transformer telling lvsa's sharding hooks whether the forward runs whole on every rank
    (:attr:`Family.cp_whole_when`)."""

    def __init__(self, adapter: DeclaredAdapter) -> None:
        self.adapter, self.now = adapter, False

    def __call__(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        self.now = self.adapter.runs_whole(transformer, args, kwargs)


class _LvsaRequired:
    """A pre-hook on the transformer refusing a forward under context parallelism whose self-attention layers do
    not run through lvsa (:attr:`Family.cp_needs_lvsa`: the model's own attention cannot run under the plan)."""

    def __init__(self, adapter: DeclaredAdapter) -> None:
        self.adapter = adapter
        self.layers: dict[str, Any] | None = None  # the modules, found once (their processors are read per forward)

    def __call__(self, transformer: Any, _args: tuple, _kwargs: dict[str, Any]) -> None:
        if self.layers is None:
            self.layers = self.adapter.self_attention_layers(transformer)
        without = [name for name, module in self.layers.items() if not isinstance(module.processor, LVSAProcessor)]
        if without:
            raise ConfigError(f"{type(transformer).__name__} runs under lvsa's context parallelism only with lvsa "
                              f"installed ({without[0]} runs the model's own attention): "
                              f"{self.adapter.declaration.cp_needs_lvsa}; call lvsa.apply on it")


class _ArgumentHook:
    """A forward pre-hook replacing one argument of a module's call, passed by keyword or by position, with
    :meth:`replace` of it (an argument the call leaves unset, or a forward that runs whole, passes through)."""

    whole: _WholeForwards | None = None

    def __init__(self, module: str, forward: Callable[..., Any], argument: str) -> None:
        self.module, self.argument = module, argument
        self.position = list(inspect.signature(forward).parameters).index(argument)  # when passed positionally

    def replace(self, value: Any) -> Any:
        raise NotImplementedError

    def __call__(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.whole is not None and self.whole.now:
            return None
        positional = self.argument not in kwargs and self.position < len(args)
        value = args[self.position] if positional else kwargs.get(self.argument)
        if value is None:
            return None
        replaced = self.replace(value)
        if positional:
            return (*args[: self.position], replaced, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.argument: replaced}


class _WithinSplit(_ArgumentHook):
    """This rank's shard of each tensor at ``argument[index]`` (a ``split_within`` entry of
    :attr:`Family.cp_plan`: a nested tuple such as Allegro's ``((tables), (positions))``, whose per-token
    positions split while the tables stay whole), or of the tensor ``argument`` itself (``index=None``: a
    ``split_input`` entry, for a module whose output diffusers' split hook refuses)."""

    def __init__(self, module: str, forward: Callable[..., Any], argument: str, index: int | None, dim: int,
                 dims: int, parallel: Any) -> None:
        super().__init__(module, forward, argument)
        self.index, self.dim, self.dims, self.parallel = index, dim, dims, parallel

    def replace(self, value: Any) -> Any:
        if self.index is None:
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"{self.module}: {self.argument} is not the tensor lvsa splits under context "
                                  "parallelism")
            return _shard(value, self.dim, self.dims, self.parallel, f"{self.module}: {self.argument}")
        what = f"{self.module}: {self.argument}[{self.index}]"
        if not isinstance(value, (tuple, list)) or not isinstance(value[self.index], (tuple, list)):
            raise ConfigError(f"{what} is not the nested tuple lvsa splits under context parallelism")
        parts = list(value)
        parts[self.index] = type(value[self.index])(_shard(t, self.dim, self.dims, self.parallel, what)
                                                    for t in value[self.index])
        return type(value)(parts)


def _unshard(part: torch.Tensor, dim: int, parallel: Any) -> torch.Tensor:
    """The whole of a tensor whose shards every rank holds (the inverse of :func:`_shard`): gathered over the
    Ulysses group, then over the ring, as the flattened ``("ring", "ulysses")`` mesh orders the shards."""
    import torch.distributed as dist

    whole = part.contiguous()
    for group in (parallel.ulysses, parallel.ring):
        if group is not None:
            parts = [torch.empty_like(whole) for _ in range(group.degree)]
            dist.all_gather(parts, whole, group=group.group)
            whole = torch.cat(parts, dim=dim)
    return whole


class _InputGather(_ArgumentHook):
    """The whole of a split input, gathered from every rank (a ``gather_input`` entry of
    :attr:`Family.cp_plan`: WanAnimate2's head, whose caller the transformer's forward is)."""

    def __init__(self, module: str, forward: Callable[..., Any], argument: str, dim: int, dims: int,
                 parallel: Any) -> None:
        super().__init__(module, forward, argument)
        self.dim, self.dims, self.parallel = dim, dims, parallel

    def replace(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() != self.dims:
            raise ConfigError(f"{self.module}: {self.argument} is not the tensor of {self.dims} dimensions lvsa "
                              "gathers under context parallelism")
        return _unshard(value, self.dim, self.parallel)


class _FrameGrid:
    """A forward pre-hook giving a module whose rotary embedding counts rows from the grid's start (WanAnimate2's
    ``rope_apply``) this rank's shard of the grid (a ``frame_grid`` entry of :attr:`Family.cp_plan`): the
    per-sample ``(frames, height, width)`` rows with the shard's frames, and the rotary table (a row per
    position; of its ``c`` columns the first ``c - 2 * (c // 3)`` are the time axis, Wan's split) with its
    time columns starting at the shard's first frame. The shards hold whole frames (``cp_whole_frames``)."""

    def __init__(self, module: str, grid: str, table: str, parallel: Any, whole: _WholeForwards | None) -> None:
        self.module, self.grid, self.table, self.parallel, self.whole = module, grid, table, parallel, whole
        self._shifted: tuple[Any, int, torch.Tensor] | None = None  # (table, start, shifted): the model keeps one

    def __call__(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.whole is not None and self.whole.now:
            return None
        grid, table = kwargs.get(self.grid), kwargs.get(self.table)
        if not isinstance(grid, torch.Tensor) or grid.dim() != 2 or grid.shape[1] != 3 \
                or not isinstance(table, torch.Tensor) or table.dim() != 2:
            raise ConfigError(f"{self.module} was called without {self.grid} as (frames, height, width) rows and "
                              f"{self.table} as a rotary table by keyword, which lvsa cuts to this rank's frames")
        frames = set(grid[:, 0].tolist())
        degree = self.parallel.degree
        if len(frames) != 1 or next(iter(frames)) % degree:
            raise ConfigError(f"{self.module}: grids of {sorted(frames)} frames do not split into {degree} shards "
                              "of whole frames")
        local = next(iter(frames)) // degree
        start = self.parallel.shard_index * local
        shard = grid.clone()
        shard[:, 0] = local
        cached = self._shifted
        if cached is None or cached[0] is not table or cached[1] != start:
            rows, columns = table.shape
            time = columns - 2 * (columns // 3)
            shifted = torch.cat([table[start:, :time], table[: rows - start, time:]], dim=1)
            cached = self._shifted = (table, start, shifted)
        return args, {**kwargs, self.grid: shard, self.table: cached[2]}


class _GatherInputs:
    """A forward pre-hook giving a layer the whole of its split inputs (a :attr:`Family.cp_ring_gathered`
    layer under ring attention): each named keyword argument, a tensor or a tuple of tensors, is gathered
    from every rank along its token dimension."""

    def __init__(self, module: str, arguments: Mapping[str, int], parallel: Any) -> None:
        self.module, self.arguments, self.parallel = module, dict(arguments), parallel

    def __call__(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        gathered = dict(kwargs)
        for argument, dim in self.arguments.items():
            value = kwargs.get(argument)
            if isinstance(value, torch.Tensor):
                gathered[argument] = _unshard(value, dim, self.parallel)
            elif isinstance(value, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in value):
                gathered[argument] = type(value)(_unshard(t, dim, self.parallel) for t in value)
            elif value is not None or argument not in kwargs:
                raise ConfigError(f"{self.module} was called without {argument} as a keyword tensor, which lvsa "
                                  "gathers from every rank under ring attention")
        return args, gathered


class _ItemGather:
    """A forward hook gathering the tensor at ``output[index]`` of a module's tuple output from every rank (a
    ``gather_item`` entry of :attr:`Family.cp_plan`: Kandinsky 6's fused blocks return the split video beside
    the audio every rank holds whole, or beside ``None``, which diffusers' gather hook cannot take)."""

    def __init__(self, module: str, index: int, dim: int, dims: int, parallel: Any) -> None:
        self.module, self.index, self.dim, self.dims, self.parallel = module, index, dim, dims, parallel

    def __call__(self, _module: Any, _args: Any, output: Any) -> Any:
        item = output[self.index] if isinstance(output, tuple) and len(output) > self.index else None
        if not isinstance(item, torch.Tensor) or item.dim() != self.dims:
            raise ConfigError(f"{self.module} did not return the tensor of {self.dims} dimensions at [{self.index}] "
                              "that lvsa gathers under context parallelism")
        parts = list(output)
        parts[self.index] = _unshard(item, self.dim, self.parallel)
        return tuple(parts)


class _VideoTail:
    """The video rows that end a packed sequence (:attr:`Family.grid` ``packed_rows``), read once per forward
    by a pre-hook on the transformer: the rows ``split_tail`` and ``gather_tail`` entries split and gather while
    the rows before them (text, conditioning, audio) stay whole on every rank."""

    def __init__(self, adapter: DeclaredAdapter, parallel: Any) -> None:
        self.adapter, self.parallel, self.rows = adapter, parallel, None

    def __call__(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        grid = self.adapter._grid_of_call(transformer, args, kwargs)
        self.rows = grid.latent_frames * grid.patches_per_frame
        if self.rows % self.parallel.degree:
            raise ConfigError(f"{type(transformer).__name__}: its {self.rows} video rows do not split into "
                              f"{self.parallel.degree} equal shards ({self.parallel.describe()}); change the frame "
                              "count or the size, or the degrees")

    def split(self, x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        """``x`` with its video rows along ``dim`` cut to this rank's shard."""
        if self.rows is None or x.shape[dim] < self.rows:
            raise ConfigError(f"{what} of shape {tuple(x.shape)} does not end in the forward's video rows")
        others, video = x.split([x.shape[dim] - self.rows, self.rows], dim)
        return torch.cat([others, _shard(video, dim, x.dim(), self.parallel, what)], dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its shard of the video rows along ``dim`` gathered from every rank."""
        shard = self.rows // self.parallel.degree
        others, video = x.split([x.shape[dim] - shard, shard], dim)
        return torch.cat([others, _unshard(video, dim, self.parallel)], dim)


class _TailSplit(_ArgumentHook):
    """The video rows of an input (a tensor or a tuple of tensors) cut to this rank's shard (a ``split_tail``
    entry of :attr:`Family.cp_plan`)."""

    def __init__(self, module: str, forward: Callable[..., Any], argument: str, dim: int, tail: _VideoTail) -> None:
        super().__init__(module, forward, argument)
        self.dim, self.tail = dim, tail

    def replace(self, value: Any) -> Any:
        what = f"{self.module}: {self.argument}"
        if isinstance(value, torch.Tensor):
            return self.tail.split(value, self.dim, what)
        if isinstance(value, tuple) and value and all(isinstance(t, torch.Tensor) for t in value):
            return tuple(self.tail.split(t, self.dim, what) for t in value)
        raise ConfigError(f"{what} is not the tensor lvsa splits under context parallelism")


class _DictSplit:
    """A forward hook keeping this rank's shard of every table of a module's dict output (a ``split_values``
    entry of :attr:`Family.cp_plan`)."""

    def __init__(self, module: str, dim: int, dims: int, parallel: Any) -> None:
        self.module, self.dim, self.dims, self.parallel = module, dim, dims, parallel

    def __call__(self, _module: Any, _args: Any, output: Any) -> Any:
        if not isinstance(output, dict):
            raise ConfigError(f"{self.module} returned {type(output).__name__}, not the dict of tables lvsa splits "
                              "under context parallelism")
        return {key: _shard(table, self.dim, self.dims, self.parallel, f"{self.module}[{key!r}]")
                for key, table in output.items()}


@dataclass(frozen=True)
class _Sharding:
    """What the sharding hooks of one transformer share: its layout, its packed sequence's video rows, and
    whether the forward runs whole."""

    parallel: Any
    tail: _VideoTail
    whole: _WholeForwards | None


#: the :attr:`Family.cp_plan` kinds lvsa applies itself to a module: ``kind -> (name, values, shared) -> (hook,
#: whether it runs before the forward)`` (a forward hook on the module's output otherwise)
_MODULE_KINDS: dict[str, Callable[[str, list[Any], _Sharding], tuple[Any, bool]]] = {
    "gather_tail": lambda name, v, s: ((lambda _m, _a, output: s.tail.gather(output, v[0])), False),
    "gather_item": lambda name, v, s: (_ItemGather(name, *v, s.parallel), False),
    "split_values": lambda name, v, s: (_DictSplit(name, *v, s.parallel), False),
    "frame_grid": lambda name, v, s: (_FrameGrid(name, *v, s.parallel, s.whole), True),
}
#: the kinds lvsa applies itself to one argument of a module: ``kind -> (name, forward, argument, values,
#: shared) -> hook``
_ARGUMENT_KINDS: dict[str, Callable[[str, Callable[..., Any], str, list[Any], _Sharding], _ArgumentHook]] = {
    "split_tail": lambda name, f, a, v, s: _TailSplit(name, f, a, v[0], s.tail),
    "split_within": lambda name, f, a, v, s: _WithinSplit(name, f, a, *v, s.parallel),
    "split_input": lambda name, f, a, v, s: _WithinSplit(name, f, a, None, *v, s.parallel),
    "gather_input": lambda name, f, a, v, s: _InputGather(name, f, a, *v, s.parallel),
}


def _is_block_mask(mask: Any) -> bool:
    return mask is not None and not isinstance(mask, torch.Tensor) and type(mask).__name__ == "BlockMask"


def _run_outside_the_graph(processor: DispatchProcessor, attn: Any, *args: Any, **kwargs: Any) -> Any:
    return processor._run_eager(attn, *args, **kwargs)


def _outside_the_graph(processor: DispatchProcessor, attn: Any, *args: Any, **kwargs: Any) -> Any:
    """The layer run eagerly from inside a compiled model: for processors that break the graph themselves
    (Mochi's per-sample loop over each prompt's valid tokens), whose frames dynamo cannot resume over lvsa's
    per-layer globals. The forward's context exists by then: ``lvsa::forward_start`` ran before."""
    return torch._dynamo.disable(_run_outside_the_graph, recursive=True)(processor, attn, *args, **kwargs)


def _diffusers_dispatch() -> Callable[..., Any]:
    from diffusers.models import attention_dispatch

    return attention_dispatch.dispatch_attention_fn


_namespaces = itertools.count()


def _namespace(name: str, contents: dict[str, Any]) -> types.ModuleType:
    """A module registered under ``name`` holding ``contents``: ``torch.compile`` finds a function's globals,
    and the modules they refer to, by their module's name."""
    module = types.ModuleType(name)
    module.__dict__.update(contents)
    module.__dict__["__name__"] = name
    sys.modules[name] = module
    return module


def _bind(function: Callable[..., Any], call: str, processor: DispatchProcessor,
          layer: str) -> tuple[Callable[..., Any], list[str]]:
    """``function`` over a copy of its module's globals in which the attention ``call`` is the layer's entry,
    and the names of the namespaces made for it."""
    code = function.__code__
    global_name = _DISPATCH if call == _DISPATCH else "F"
    wrong = global_name not in code.co_names
    if call == _SDPA and not wrong:
        wrong = function.__globals__.get("F") is not torch.nn.functional
    if wrong:
        raise ConfigError(
            f"layer {layer}: its processor {function.__qualname__} does not call {call}, where lvsa runs this "
            "family's attention; restore the model's own processor (or lvsa.remove) before lvsa.apply")
    base = f"{__name__}.layer_{next(_namespaces)}"
    names = [base]
    replacement: Any = processor.dispatch
    if call == _SDPA:
        names.append(f"{base}_functional")
        functional = {**vars(torch.nn.functional), "scaled_dot_product_attention": processor.sdpa}
        replacement = _namespace(names[1], functional)
    namespace = _namespace(base, {**function.__globals__, global_name: replacement})
    # a code object of its own: torch.compile keeps its compiled frames per code object, and a frame compiled
    # over one layer's globals (a processor with a graph break, such as Mochi's per-sample loop) must not be
    # run over another's
    rebound = types.FunctionType(code.replace(), namespace.__dict__, function.__name__, function.__defaults__,
                                 function.__closure__)
    rebound.__kwdefaults__ = function.__kwdefaults__
    return rebound, names


# -- the grid of a packed sequence -------------------------------------------------------------------
@torch.compiler.disable
def packed_grid(model: str, positions: torch.Tensor, video_indices: torch.Tensor) -> LatentGrid:
    """The frame grid of a packed sequence (:attr:`Family.grid` ``packed_rows``): the video rows that end the
    sequence, laid out as :func:`coordinate_grid` checks. Read off the rows' values (a layout's shapes do not
    tell its frames), checked, never guessed. Outside any compiled graph: the grid is plain ints for the plan."""
    length = positions.shape[0]
    video = video_indices.detach().to("cpu", torch.int64)
    # the run of video rows that ends the sequence (conditioning video rows sit earlier, apart from it)
    aligned = video == torch.arange(length - video.numel(), length)
    apart = (~aligned).nonzero()
    rows = video.numel() - (int(apart[-1]) + 1 if apart.numel() else 0)
    grid, problem = (None, "no video row ends the sequence") if rows == 0 else _frames_of(positions[length - rows:])
    if problem is not None:
        raise ConfigError(f"{model}: the packed sequence's video rows do not form a frame grid ({problem}); "
                          "lvsa plans the video rows that end the sequence, a frame per value of position_ids' t")
    return grid


@torch.compiler.disable  # read off values: plain ints for the plan, outside any graph
def coordinate_grid(model: str, argument: str, coordinates: torch.Tensor) -> LatentGrid:
    """The frame grid of a token sequence given by its per-token ``[B, 3, N]`` ``(t, h, w)`` coordinates
    (:attr:`Family.grid_coordinates`): every sample's the same, laid out frame after frame."""
    coordinates = coordinates.detach()
    problem = None
    if coordinates.dim() != 3 or coordinates.shape[1] != 3:
        problem = f"shape {tuple(coordinates.shape)}, not [B, 3, N]"
    elif not (coordinates == coordinates[:1]).all():
        problem = "the samples of the batch differ"
    else:
        grid, problem = _frames_of(coordinates[0].T)
    if problem is not None:
        raise ConfigError(f"{model}: its {argument} do not form a frame grid ({problem}); lvsa plans tokens laid "
                          "out frame after frame, a frame per value of t, and not conditioning tokens placed apart "
                          "from the video's grid")
    return grid


@torch.compiler.disable  # read off values: plain ints for the plan, outside any graph
def reference_frames(model: str, argument: str, types: torch.Tensor, frames: int) -> int:
    """How many of a latent's ``frames`` are reference frames appended after the video
    (:attr:`Family.reference_frames`): the nonzero per-frame token types that end it, the same in every sample."""
    types = types.detach().to("cpu")
    problem = None
    if types.dim() != 2 or types.shape[1] != frames:
        problem = f"shape {tuple(types.shape)}, not [B, {frames}]"
    elif not (types == types[:1]).all():
        problem = "the samples of the batch differ"
    else:
        marked = (types[0] != 0).flip(0).to(torch.int64)
        count = int(marked.cumprod(0).sum())
        if marked[count:].any():
            problem = "a reference frame sits inside the video, not after it"
        elif count == frames:
            problem = "every frame is a reference frame"
    if problem is not None:
        raise ConfigError(f"{model}: its {argument} do not mark reference frames after the video ({problem}); "
                          "lvsa plans the video's frames and attends the reference frames that end the latent "
                          "from every frame")
    return count


def _given(value: Any) -> bool:
    """Whether a forward argument is set: a tensor of any value, a non-empty sequence, a true flag."""
    return isinstance(value, torch.Tensor) or bool(value)


def _frames_of(positions: torch.Tensor) -> tuple[LatentGrid | None, str | None]:
    """The grid of video rows by their rotary ``(t, h, w)`` (``[rows, 3]``): a frame per run of equal ``t``,
    rising from frame to frame, each frame on the first one's ``(h, w)`` positions; or why they are not."""
    rows = positions.shape[0]
    grid = positions.to("cpu", torch.float64)
    time = grid[:, 0]
    changes = (time[1:] != time[:-1]).nonzero()
    per_frame = int(changes[0]) + 1 if changes.numel() else rows
    if rows % per_frame:
        return None, f"its {rows} video rows are not whole frames of {per_frame} rows"
    frames = grid.view(rows // per_frame, per_frame, 3)
    if not (frames[:, :, 0] == frames[:, :1, 0]).all() or not (frames[1:, 0, 0] > frames[:-1, 0, 0]).all():
        return None, "their rotary time is not one value per frame, rising from frame to frame"
    if not (frames[:, :, 1:] == frames[:1, :, 1:]).all():
        return None, "their frames do not share one (h, w) layout"
    return LatentGrid(rows // per_frame, per_frame), None


# -- the adapter --------------------------------------------------------------------------------------
class DeclaredAdapter(ModelAdapter):
    """The adapter of a declared :class:`Family`."""

    def __init__(self, family: Family) -> None:
        self.declaration = family
        self.name = family.name  # type: ignore[misc]
        self.transformer_classes = family.classes  # type: ignore[misc]
        self.latent_axes = family.latent_axes  # type: ignore[misc]
        self._positions: dict[type, dict[str, int]] = {}

    def family(self, transformer: Any) -> ModelFamily:
        return self._model_family(self.declaration.variant(transformer.config))

    def family_defaults(self) -> ModelFamily:
        return self._model_family(next(v for v in self.declaration.variants if not v.when))

    def _model_family(self, variant: Variant) -> ModelFamily:
        if variant.refusal:
            raise ConfigError(f"lvsa does not run {self.declaration.classes[0]} as {variant.name}: {variant.refusal}")
        return self.declaration.model_family(variant)

    def self_attention_layers(self, transformer: Any) -> dict[str, Any]:
        pattern = self.declaration.layer_pattern()
        found = {name: module for name, module in transformer.named_modules()
                 if pattern.fullmatch(name) and hasattr(module, "processor")}
        if not found:
            raise ConfigError(f"{type(transformer).__name__}: no module matches the self-attention layers "
                              f"declared for {self.name} ({', '.join(self.declaration.layers)})")
        return found

    def make_processor(self, original: Any, runtime: LVSARuntime, layer: str) -> Any:
        return processor_for(original, runtime, layer, self.declaration)

    def forward_argument(self, transformer: Any, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        positions = self._positions.get(type(transformer))
        if positions is None:
            parameters = list(inspect.signature(type(transformer).forward).parameters)[1:]
            positions = {p: i for i, p in enumerate(parameters)}
            self._positions[type(transformer)] = positions
        index = positions.get(name)
        return args[index] if index is not None and index < len(args) else None

    def runs_whole(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether this forward runs whole on every rank under context parallelism (:attr:`Family.cp_whole_when`)."""
        return any(self.forward_argument(transformer, name, args, kwargs) == value
                   for name, value in self.declaration.cp_whole_when.items())

    def parallel_of_call(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> ContextParallel | None:
        if self.declaration.cp_whole_when and self.runs_whole(transformer, args, kwargs):
            return None
        return super().parallel_of_call(transformer, args, kwargs)

    def grid_of_call(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> LatentGrid:
        declaration = self.declaration
        if getattr(transformer, "_parallel_config", None) is not None:
            for name, why in declaration.cp_refused_arguments.items():
                if _given(self.forward_argument(transformer, name, args, kwargs)):
                    raise ConfigError(f"{type(transformer).__name__} was called with {name} under context "
                                      f"parallelism, which lvsa does not run: {why}; run it in one process")
            for name, why in declaration.cp_per_sample_arguments.items():
                value = self.forward_argument(transformer, name, args, kwargs)
                if isinstance(value, torch.Tensor) and value.dim() > 1:
                    raise ConfigError(f"{type(transformer).__name__} was called with a {name} of shape "
                                      f"{tuple(value.shape)} under context parallelism, where lvsa runs one per "
                                      f"sample: {why}; run it in one process")
        grid = self._grid_of_call(transformer, args, kwargs)
        if declaration.reference_frames is not None:
            types = self.forward_argument(transformer, declaration.reference_frames, args, kwargs)
            if types is not None:
                references = reference_frames(type(transformer).__name__, declaration.reference_frames, types,
                                              grid.latent_frames)
                grid = LatentGrid(grid.latent_frames - references, grid.patches_per_frame)
        parallel = self.parallel_of_call(transformer, args, kwargs) if declaration.cp_whole_frames else None
        if parallel is not None:
            degree = parallel.degree
            if grid.latent_frames % degree:
                raise ConfigError(f"{type(transformer).__name__} splits its per-frame inputs with the frames under "
                                  f"context parallelism: its {grid.latent_frames} latent frames do not split into "
                                  f"{degree} shards of whole frames; change the frame count or the degrees")
        return grid

    def _grid_of_call(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> LatentGrid:
        if self.declaration.grid == "latent":
            return super().grid_of_call(transformer, args, kwargs)
        if self.declaration.grid == "latent_list":
            latents = self.forward_argument(transformer, "hidden_states", args, kwargs)
            sizes = {tuple(latent.shape[1:]) for latent in latents} if isinstance(latents, (list, tuple)) else set()
            if len(sizes) != 1 or len(next(iter(sizes))) != 3:
                raise ConfigError(f"{type(transformer).__name__} was called with hidden_states that are not a list "
                                  f"of [C, F, H, W] latents of one size ({sorted(sizes) or type(latents).__name__}): "
                                  "lvsa plans one grid per forward")
            return self.grid_of(transformer, *next(iter(sizes)))
        if self.declaration.grid == "packed_rows":
            positions, video = (self.forward_argument(transformer, n, args, kwargs)
                                for n in ("position_ids", "video_indices"))
            if positions is None or video is None:
                raise ConfigError(f"{type(transformer).__name__} was called without position_ids and "
                                  "video_indices, which give lvsa the frame grid of its packed sequence")
            return packed_grid(type(transformer).__name__, positions, video)
        sizes = [self.forward_argument(transformer, n, args, kwargs) for n in ("num_frames", "height", "width")]
        coordinates = self.declaration.grid_coordinates
        if any(s is None for s in sizes) and coordinates is not None:
            given = self.forward_argument(transformer, coordinates, args, kwargs)
            if given is not None:
                return coordinate_grid(type(transformer).__name__, coordinates, given)
        if any(s is None for s in sizes):
            also = f" (or {coordinates})" if coordinates else ""
            raise ConfigError(f"{type(transformer).__name__} was called without num_frames, height and width{also}, "
                              "which give lvsa the latent grid of its token sequence")
        return self.grid_of(transformer, *(int(s) for s in sizes))

    def step_timestep(self, transformer: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        timestep = self.forward_argument(transformer, "timestep", args, kwargs)
        if self.declaration.step_clock == "timestep" or timestep is None:
            return timestep
        rows = self.forward_argument(transformer, "timestep_indices", args, kwargs)
        if rows is None:
            raise ConfigError(f"{type(transformer).__name__} was called without timestep_indices, which give "
                              "lvsa the timestep of its video rows")
        # the last row's timestep, rising from 0 to 1 over the loop: counted as a falling one
        return 1 - timestep.index_select(0, rows[-1:])

    def cp_plan(self, transformer: Any) -> dict[str, Any] | None:
        declared = self.declaration.cp_plan
        if declared is None:
            return None
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        def spec(entry: tuple[Any, ...]) -> Any:
            kind, *values = entry
            if kind == "split":
                dim, dims, output = values
                return ContextParallelInput(split_dim=dim, expected_dims=dims, split_output=output)
            dim, dims = values
            return ContextParallelOutput(gather_dim=dim, expected_dims=dims)

        def specs(value: Any) -> Any:  # a list: one spec per element of a list input
            return [spec(v) for v in value] if isinstance(value, list) else spec(value)

        plan = {}
        for module, value in declared.items():
            if _lvsa_split(value):
                continue
            if isinstance(value, tuple):
                plan[_last_module(transformer, module)] = spec(value)
            elif entries := {k: specs(v) for k, v in value.items() if not _lvsa_split(v)}:
                plan[_last_module(transformer, module)] = entries
        return plan

    def check_context_parallel(self, transformer: Any, degree: int) -> None:
        if not self.declaration.context_parallel:
            raise ConfigError(f"{type(transformer).__name__}: lvsa's context parallelism is not declared for "
                              f"{self.name}: {self.declaration.no_context_parallel}; run it in one process")
        for key, (accepted, why) in self.declaration.cp_accepted_config.items():
            value = getattr(transformer.config, key, None)
            if value not in accepted:
                raise ConfigError(f"{type(transformer).__name__} with {key}={value!r}: lvsa's context parallelism "
                                  f"does not run it: {why}; run it in one process")
        super().check_context_parallel(transformer, degree)

    def finish_context_parallel(self, transformer: Any) -> None:
        parallel = context_parallel_of(transformer)
        tail = _VideoTail(self, parallel)
        if self.declaration.grid == "packed_rows":
            transformer.register_forward_pre_hook(tail, with_kwargs=True)
        if self.declaration.cp_needs_lvsa:
            transformer.register_forward_pre_hook(_LvsaRequired(self), with_kwargs=True)
        whole = None
        if self.declaration.cp_whole_when:
            whole = _WholeForwards(self)
            transformer.register_forward_pre_hook(whole, with_kwargs=True)
        shared = _Sharding(parallel, tail, whole)
        for module, value in (self.declaration.cp_plan or {}).items():
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            for argument, (kind, *values) in [(a, e) for a, e in entries if _lvsa_split(e)]:
                for name, found in self._modules(transformer, _last_module(transformer, module)):
                    if argument is None:
                        hook, before = _MODULE_KINDS[kind](name, values, shared)
                        if before:
                            found.register_forward_pre_hook(hook, with_kwargs=True)
                        else:
                            found.register_forward_hook(hook)
                    else:
                        hook = _ARGUMENT_KINDS[kind](name, found.forward, argument, values, shared)
                        hook.whole = whole
                        found.register_forward_pre_hook(hook, with_kwargs=True)
        for module in self._attention_modules(transformer, self.declaration.cp_local_layers):
            module.processor._parallel_config = None
        if parallel is None or parallel.ring is None:
            return
        for layers, arguments in self.declaration.cp_ring_gathered.items():
            for name, module in self._attention_modules(transformer, (layers,), named=True):
                module.processor._parallel_config = None
                module.register_forward_pre_hook(_GatherInputs(name, arguments, parallel), with_kwargs=True)

    def _modules(self, transformer: Any, module: str) -> list[tuple[str, Any]]:
        """The modules a :attr:`Family.cp_plan` name (a pattern) matches; one that matches none is an error."""
        pattern = self.declaration.layer_pattern((module,))
        found = [(name, m) for name, m in transformer.named_modules() if pattern.fullmatch(name)]
        if not found:
            raise ConfigError(f"{type(transformer).__name__}: no module matches {module}, named in the context-"
                              f"parallel plan declared for {self.name}")
        return found

    def _attention_modules(self, transformer: Any, layers: tuple[str, ...], named: bool = False) -> list[Any]:
        """The attention modules (those with a processor) matching ``layers``; declared layers that match
        none are an error (a declaration that no longer fits the model's module names)."""
        if not layers:
            return []
        pattern = self.declaration.layer_pattern(layers)
        found = [(name, module) for name, module in transformer.named_modules()
                 if pattern.fullmatch(name) and hasattr(module, "processor")]
        if not found:
            raise ConfigError(f"{type(transformer).__name__}: no attention module matches the layers declared for "
                              f"context parallelism ({', '.join(layers)})")
        return found if named else [module for _, module in found]

    def check_ring(self, transformer: Any, degree: int) -> None:
        if degree > 1 and not self.declaration.ring:
            raise ConfigError(f"{type(transformer).__name__}: ring attention is not declared for {self.name}, only "
                              "Ulysses: use ulysses_degree for every process (ring_degree=1)")

    def temporal_rope(self, transformer: Any) -> TemporalRope | None:
        return None

    def install_riflex(self, transformer: Any, runtime: LVSARuntime) -> list[Any]:
        raise ConfigError(f"RIFLEx is not available for {type(transformer).__name__} (family {self.name}): lvsa "
                          "knows its rotary layout only for Wan, HunyuanVideo 1.5 and CogVideoX")
