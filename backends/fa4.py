"""FlashAttention-4 block-sparse attention on CUDA (Hopper sm90, Blackwell sm100), through torch's FlexAttention
with ``kernel_options={"BACKEND": "FLASH"}``, which compiles the mask into FA4's CuTe DSL kernel.

The plan becomes a FlexAttention ``BlockMask`` over ``block x block`` token tiles of the whole sequence (video
and text). Tokens belong to *groups*: one per latent frame, and one for the text; a ``[G, G]`` boolean table
says which query group attends which key group (the plan's frames; text queries attend everything, every
query attends the text). A tile is

- *full* when every (query, key) pair in it is attended: the kernel skips the mask there;
- *partial* when only some are (a tile crosses a frame boundary: 1560 tokens per frame = 12 x 128 + 24, or
  holds several frames when P < 128; or it holds padded text keys): the kernel applies ``mask_mod``;
- skipped otherwise.

The tiles are classified on the device in a few vectorised operations (a 2-d prefix sum over the group table
counts the attended pairs of each tile), once per plan: rotation changes these tensors once per step. Shapes
depend only on the geometry, so the compiled kernel is reused across the steps of a generation. A dense plan
without padded text runs FA4's dense kernel (no block mask).

Install with ``pip install 'lvsa[fa4]'``. The first call of a shape compiles the kernel (several seconds,
logged once per shape)."""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lvsa import log, registry
from lvsa.driver import AttentionProblem, Availability, Driver, Prepared
from lvsa.errors import DriverUnavailable
from lvsa.plan import SparsePlan

#: what each missing piece is called in pip terms
_PACKAGES = {
    "flash_attn.cute": "flash-attn-4",
    "cutlass": "nvidia-cutlass-dsl",
    "quack": "quack-kernels",
}
_compiled: set[tuple[Any, ...]] = set()
_lock = threading.Lock()
#: kernels (shapes, masks) compiled per process before fa4 refuses
_SHAPES_PER_PROCESS = 64


@dataclass(frozen=True)
class BlockTables:
    """The plan as tiles: FlexAttention's ``from_kv_blocks`` arguments (``[1, 1, query tiles, ...]`` int32)."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    block: int
    #: ``[G, G]`` bool: query group attends key group
    attended: torch.Tensor


@dataclass(frozen=True)
class Fa4Prepared(Prepared):
    #: None: dense plan without padded text keys (FA4's dense kernel)
    block_mask: Any
    #: ``[B, S]`` bool, True = key kept; rewritten from the padding mask at every call (None: no padding)
    keep: torch.Tensor | None


def group_layout(plan: SparsePlan) -> tuple[int, int]:
    """``(groups, text group)``: groups are numbered in token order, the text's is first when the text comes
    before the video and last when after (-1 without text)."""
    T = plan.latent_frames
    if not plan.text_tokens:
        return T, -1
    return T + 1, (0 if plan.text_position == "before" else T)


def group_of(plan: SparsePlan) -> Callable[[torch.Tensor], torch.Tensor]:
    """The group of token positions, in index arithmetic: the one formula that the tile classification
    (vectorised over positions) and the kernel's ``mask_mod`` (per position, Python ints as constants) share."""
    P, vs, V = plan.patches_per_frame, plan.video_start, plan.video_tokens
    _, text_group = group_layout(plan)
    if text_group < 0:
        return lambda token: token // P
    first_frame = 1 if text_group == 0 else 0

    def group(token: torch.Tensor) -> torch.Tensor:
        video = (token >= vs) & (token < vs + V)
        return torch.where(video, (token - vs) // P + first_frame, text_group)

    return group


def attended_groups(plan: SparsePlan, device: torch.device | str) -> torch.Tensor:
    """``[G, G]`` bool: the plan's frame pattern, plus the text group attending and attended by everything."""
    groups, text_group = group_layout(plan)
    first_frame = 1 if text_group == 0 else 0
    T, L = plan.latent_frames, plan.attended_per_frame
    table = torch.zeros(groups, groups, dtype=torch.bool)
    rows = torch.arange(T).repeat_interleave(L) + first_frame
    cols = torch.tensor(plan.indices, dtype=torch.long) + first_frame
    table[rows, cols] = True
    if text_group >= 0:
        table[text_group, :] = True
        table[:, text_group] = True
    return table.to(device)


def block_tables(plan: SparsePlan, block: int, device: torch.device | str, padded_text: bool) -> BlockTables:
    """Classify every ``block x block`` tile of the sequence as full, partial or skipped (see the module)."""
    S = plan.seq_len
    attended = attended_groups(plan, device)
    groups, text_group = group_layout(plan)
    tiles = -(-S // block)
    starts = torch.arange(tiles, device=device) * block
    ends = torch.clamp(starts + block, max=S) - 1
    group = group_of(plan)
    lo, hi = group(starts), group(ends)  # groups are contiguous in token order
    # prefix[i, j] = attended pairs among query groups < i and key groups < j
    prefix = torch.zeros(groups + 1, groups + 1, dtype=torch.int64, device=device)
    prefix[1:, 1:] = attended.long().cumsum(0).cumsum(1)
    r0, r1 = lo[:, None], hi[:, None] + 1
    c0, c1 = lo[None, :], hi[None, :] + 1
    pairs = prefix[r1, c1] - prefix[r0, c1] - prefix[r1, c0] + prefix[r0, c0]
    full = pairs == (r1 - r0) * (c1 - c0)
    if padded_text and text_group >= 0:
        holds_text = (lo <= text_group) & (text_group <= hi)
        full &= ~holds_text[None, :]  # a padded text key must go through the mask
    partial = (pairs > 0) & ~full

    def csr(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = selected.sum(-1, dtype=torch.int32)
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count[None, None], order[None, None]

    kv_num, kv_idx = csr(partial)
    full_num, full_idx = csr(full)
    return BlockTables(kv_num, kv_idx, full_num, full_idx, block, attended)


def mask_mod_for(plan: SparsePlan, attended: torch.Tensor, keep: torch.Tensor | None) -> Callable[..., Any]:
    """``mask_mod(b, h, q, k)`` over :func:`group_of` (Python ints become constants of the compiled kernel;
    the tensors are its captured buffers)."""
    group = group_of(plan)
    if keep is None:
        def mask_mod(b, h, q, k):
            return attended[group(q), group(k)]
    else:
        def mask_mod(b, h, q, k):
            return attended[group(q), group(k)] & keep[b, k]
    return mask_mod


class Fa4Driver(Driver[Fa4Prepared]):
    name = "fa4"
    priority = 40
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    head_dims = frozenset({64, 96, 128})

    def __init__(self, block: int = 128, kernel_backend: str | None = "FLASH", compiled: bool = True,
                 devices: frozenset[str] | None = None, dtypes: frozenset[Any] | None = None) -> None:
        """The defaults are the CUDA driver. ``kernel_backend=None, compiled=False`` with CPU devices and any
        dtype runs the same block mask through FlexAttention's reference path: the tests check the tiles that
        way on machines without a GPU."""
        self.block = block
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
            keep = torch.ones(problem.batch, plan.seq_len, dtype=torch.bool, device=device)
        if plan.is_dense and keep is None:
            block_mask = None
        else:
            block_mask = self.block_mask(plan, device, keep)
        key = (problem.dtype, problem.head_dim, problem.q_heads, problem.kv_heads, plan.seq_len, problem.batch,
               block_mask is None, keep is None, device)
        if self.compiled and key not in _compiled:
            with _lock:
                _compiled.add(key)
            log.info(f"fa4: first call of {str(problem.dtype)[6:]} head_dim={problem.head_dim} seq_len={plan.seq_len} "
                     f"{'dense' if block_mask is None else 'block-sparse'} in this process compiles the kernel "
                     "(several seconds; reused for every step of this shape)")
        return Fa4Prepared(plan, problem, block_mask, keep)

    def block_mask(self, plan: SparsePlan, device: torch.device, keep: torch.Tensor | None) -> Any:
        from torch.nn.attention.flex_attention import BlockMask

        tables = block_tables(plan, self.block, device, padded_text=keep is not None)
        S = plan.seq_len
        return BlockMask.from_kv_blocks(
            tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks, tables.full_kv_indices,
            BLOCK_SIZE=(self.block, self.block), mask_mod=mask_mod_for(plan, tables.attended, keep),
            seq_lengths=(S, S),
        )

    def run(self, prepared: Fa4Prepared, q, k, v, key_padding_mask=None):
        plan = prepared.plan
        if prepared.keep is not None:
            if key_padding_mask is None:
                raise ValueError("fa4: prepared for a padding mask but called without one")
            prepared.keep[:, plan.text_start : plan.text_start + plan.text_tokens] = key_padding_mask
        attention = _flex(self.compiled)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kwargs = dict(block_mask=prepared.block_mask, scale=prepared.scale, enable_gqa=q.shape[2] != k.shape[2],
                      kernel_options=self.kernel_options)
        if not self.compiled:
            return attention(*args, **kwargs).transpose(1, 2)
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


@functools.cache
def _flex(compiled: bool) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: shapes and the mask's Python constants are fixed per geometry, which FA4's CuTe template needs
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


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
