"""FlashAttention-4 block-sparse attention on CUDA (Hopper sm90, Blackwell sm100), through torch's FlexAttention
with ``kernel_options={"BACKEND": "FLASH"}``, which compiles the mask into FA4's CuTe DSL kernel.

The plan becomes a FlexAttention ``BlockMask`` (:mod:`lvsa.kernels.block_mask`: tiles, key orders, the
``mask_mod``), prepared once per plan; rotation changes those tensors once per step, and since shapes and the
kernel's constants depend only on the geometry, the compiled kernel is reused across the steps of a
generation. A dense plan without padded text runs FA4's dense kernel (no block mask).

The keys and values go into the tiles' order by moving the few tokens :func:`~lvsa.kernels.block_mask.in_place_side`
moves inside the caller's k and v, and back after the kernel. Where the caller's tensors cannot be written
(:func:`in_place_refusal`: inside ``torch.compile``, q, k or v requiring grad, k and v sharing memory with each
other or q), it copies them into that order instead and logs why once. The queries stay in token order, so
the output needs no copy back. What each choice measured is in docs/performance.md.

Install with ``pip install 'lvsa[fa4]'``. The first call of a shape compiles the kernel (several seconds,
logged once per shape)."""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lvsa import caches, log, registry
from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.errors import DriverUnavailable
from lvsa.kernels.block_mask import (
    TileLayout,
    block_mask,
    block_tables,
    check_mask_form,
    flex_attention,
    key_order_side,
    to_tiles,
)
from lvsa.plan import SparsePlan

#: what each missing piece is called in pip terms
_PACKAGES = {
    "flash_attn.cute": "flash-attn-4",
    "cutlass": "nvidia-cutlass-dsl",
    "quack": "quack-kernels",
}
_compiled: set[tuple[Any, ...]] = set()  # shapes whose compile was logged (once per process)
_lock = threading.Lock()
#: kernels (shapes, masks) compiled per process before fa4 refuses
_SHAPES_PER_PROCESS = 64


@dataclass(frozen=True)
class Fa4Prepared(Prepared):
    #: None: dense plan without padded text keys (FA4's dense kernel)
    block_mask: Any
    #: ``[B, tiles x block]`` bool over kernel key positions, True = key kept; the text's entries are rewritten
    #: from the padding mask at every call (None: no padding)
    keep: torch.Tensor | None
    layout: TileLayout | None



class Fa4Driver(Driver[Fa4Prepared]):
    name = "fa4"
    priority = 40
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = frozenset({64, 96, 128})

    def __init__(self, block: int = 128, kernel_backend: str | None = "FLASH", compiled: bool = True,
                 devices: frozenset[str] | None = None, dtypes: frozenset[Any] | None = None,
                 key_order: str = "in-place", mask_form: str = "interval") -> None:
        """The defaults are the CUDA driver. ``kernel_backend=None, compiled=False`` with CPU devices and any
        dtype runs the same block mask through FlexAttention's reference path: the tests check the tiles that
        way on machines without a GPU. ``key_order`` is one of :data:`lvsa.kernels.block_mask.KEY_ORDERS` (the
        others for comparison: see ``tile_layout``); ``mask_form`` one of ``MASK_FORMS`` (see ``mask_mod_for``)."""
        key_order_side(key_order)  # an unknown order fails here, not at the first call
        self.block = block
        self.key_order = key_order
        self.mask_form = check_mask_form(mask_form)
        self.kernel_options = {"BACKEND": kernel_backend} if kernel_backend else None
        self.compiled = compiled
        if devices is not None:
            self.devices = devices
        if dtypes is not None:
            self.dtypes = dtypes

    def is_available(self, device_type: str) -> Availability:
        base = super().is_available(device_type)
        if not base:
            return base
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError:
            return Availability.no(f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)")
        if self.kernel_options is None:
            return Availability.yes("FlexAttention block mask (reference path)")
        if not _has_flash_backend():
            return Availability.no(f"torch {torch.__version__}'s FlexAttention has no FLASH backend (FA4)")
        missing = [f"{_PACKAGES[m]} ({m})" for m in _PACKAGES if not _importable(m)]
        if missing:
            return Availability.no(f"not installed: {', '.join(missing)} (pip install 'lvsa[fa4]')")
        if not _cutlass_libraries():
            return Availability.no("nvidia-cutlass-dsl's CUDA libraries are missing "
                                   "(pip install 'nvidia-cutlass-dsl-libs-cu13', or 'lvsa[fa4]')")
        present, (major, minor) = registry.device_capability("cuda")
        if not present:
            return present
        if major not in (9, 10):
            return Availability.no(f"FA4 runs on Hopper (sm90) and Blackwell (sm100); this GPU is sm{major}{minor}")
        return Availability.yes(f"FlashAttention-4 block-sparse through FlexAttention (sm{major}{minor})")

    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> Fa4Prepared:
        device = torch.device(problem.device_type, problem.device_index)
        keep = None
        if problem.has_padding_mask:
            keep = to_tiles(torch.ones(problem.batch, plan.seq_len, dtype=torch.bool, device=device), self.block)
        mask = layout = None
        if not plan.is_dense or keep is not None:
            tables = block_tables(plan, self.block, device, padded_text=keep is not None,
                                  key_order=self.key_order)
            mask, layout = block_mask(plan, tables, keep, self.mask_form), tables.layout
        key = (problem.dtype, problem.head_dim, problem.q_heads, problem.kv_heads, plan.seq_len, problem.batch,
               mask is None, keep is None, device, self.key_order, self.mask_form)
        if self.compiled and key not in _compiled:
            with _lock:
                _compiled.add(key)
            log.info(f"fa4: first call of {str(problem.dtype)[6:]} head_dim={problem.head_dim} seq_len={plan.seq_len} "
                     f"{'dense' if mask is None else 'block-sparse'} in this process compiles the kernel "
                     "(several seconds; reused for every step of this shape)")
        return Fa4Prepared(plan, problem, mask, keep, layout)

    def run(self, prepared: Fa4Prepared, q, k, v, key_padding_mask=None):
        layout = prepared.layout
        if prepared.keep is not None:
            if key_padding_mask is None:
                raise ValueError("fa4: prepared for a padding mask but called without one")
            prepared.keep[:, layout.text_keys] = key_padding_mask
        keys = None if layout is None else layout.keys
        if keys is None or keys.order is None:
            return self._attend(prepared, q, k, v)
        refusal = "this key order moves every token" if keys.moved is None else in_place_refusal(q, k, v)
        if refusal is not None:
            log_copy_once(refusal)
            return self._attend(prepared, q, k.index_select(1, keys.order), v.index_select(1, keys.order))
        # the few moved tokens, in the caller's k and v and back: the kernel reads them in between (same stream)
        kernel_positions, tokens = keys.moved
        moved_k, moved_v = k.index_select(1, tokens), v.index_select(1, tokens)
        k.index_copy_(1, kernel_positions, moved_k)
        v.index_copy_(1, kernel_positions, moved_v)
        try:
            return self._attend(prepared, q, k, v)
        finally:
            k.index_copy_(1, tokens, moved_k)
            v.index_copy_(1, tokens, moved_v)

    def _attend(self, prepared: Fa4Prepared, q, k, v):
        attention = flex_attention(self.compiled)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kwargs = dict(block_mask=prepared.block_mask, scale=prepared.scale, enable_gqa=q.shape[2] != k.shape[2],
                      kernel_options=self.kernel_options)
        if not self.compiled:
            out = attention(*args, **kwargs)
        else:
            # every shape compiles its own kernel; past dynamo's default of 8 shapes it would silently run
            # FlexAttention's unfused fallback (a full score matrix: slow, or out of memory): raise instead
            with torch._dynamo.config.patch(recompile_limit=_SHAPES_PER_PROCESS, fail_on_recompile_limit_hit=True):
                try:
                    out = attention(*args, **kwargs)
                except Exception as error:
                    if "recompile" not in type(error).__name__.lower() and "RecompileLimit" not in str(error):
                        raise
                    raise DriverUnavailable(
                        f"fa4: more than {_SHAPES_PER_PROCESS} attention shapes were compiled in this process; "
                        "FlexAttention would fall back to its unfused path. Use fewer distinct shapes per process, "
                        "or another backend") from error
        return out.transpose(1, 2)


def in_place_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the moved tokens cannot be moved in the caller's k and v and back (None: they can). Each case
    would give a wrong result or an error, so those calls copy every token instead."""
    if torch.compiler.is_compiling():
        return "inside torch.compile (the graph copies)"
    if any(t.requires_grad for t in (q, k, v)):  # autograd may save k and v: a write would break its backward
        return "q, k or v requires grad"
    if (k.is_inference() or v.is_inference()) and not torch.is_inference_mode_enabled():
        return "k or v was made in inference mode and cannot be written outside it"
    if any(torch._debug_has_internal_overlap(t) != 0 for t in (k, v)):
        return "k or v has elements that share memory (an expanded tensor)"
    storages = [t.untyped_storage().data_ptr() for t in (q, k, v)]
    if len(set(storages)) < 3:
        return "q, k and v share memory (views of one tensor, or the same tensor)"
    return None


_copy_reasons: set[str] = set()


def _forget_logged() -> None:
    with _lock:
        _compiled.clear()
        _copy_reasons.clear()


caches.register("fa4-logged", _forget_logged)


def log_copy_once(reason: str) -> None:
    """Say once per reason why a call copies the keys and values instead of moving a few in place."""
    if not torch.compiler.is_compiling() and reason not in _copy_reasons:
        _copy_reasons.add(reason)
        log.info(f"fa4: keys and values are copied into the kernel's order ({reason})")




def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def _cutlass_libraries() -> bool:
    """The CUDA build of the CuTe DSL runtime (nvidia-cutlass-dsl-libs-cu13, or -cu12): a shared library."""
    if not _importable("nvidia_cutlass_dsl"):
        return False
    roots = importlib.util.find_spec("nvidia_cutlass_dsl").submodule_search_locations or []
    return any(any(Path(root).glob("cu1*/lib/libcute_dsl_runtime*")) for root in roots)


def _has_flash_backend() -> bool:
    return _importable("torch._inductor.kernel.flex.flex_flash_attention")

