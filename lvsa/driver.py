"""The driver contract: what an attention driver declares, and the two calls it answers.

A driver is small, in three parts (the split vLLM makes between a backend's capabilities, its metadata
builder and its implementation, and FlashInfer's ``plan()``/``run()``):

- **capabilities**: class attributes (devices, dtypes, head dims, GQA, text tokens), :meth:`Driver.check`
  for one problem, and :meth:`Driver.is_available` (can it run on a device here, and if not why; never
  raising, never compiling);
- **prepare**: everything fixed for a plan and a problem shape (index tensors, kernel plans, the softmax
  scale) becomes the driver's own typed :class:`Prepared` state, once per plan change, cached by the
  dispatcher and shared by every layer;
- **run**: q, k, v (and the text padding mask, which is data) through the prepared state; no host work.

"Driver" is the one word for a pluggable attention implementation; the user-facing setting that picks
one keeps its historical name ``backend`` (``LVSA_BACKEND``, ``--backend``, the ``lvsa.backends`` entry
points)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from .errors import GeometryError

if TYPE_CHECKING:
    import torch

    from .plan import SparsePlan


#: the default upper bound on the keys and values one chunk of query frames gathers (:attr:`Driver.gather_budget_bytes`)
GATHER_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class Availability:
    """Truthy when the driver (or device) can run; ``reason`` says why not, naming the fix."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def yes(cls, reason: str = "ready") -> Availability:
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


@dataclass(frozen=True)
class AttentionProblem:
    """The shape of one attention call, as far as choosing and preparing a driver is concerned."""

    device_type: str
    device_index: int | None
    dtype: torch.dtype
    batch: int
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    text_tokens: int
    has_padding_mask: bool
    #: the softmax scale, resolved (``1/sqrt(head_dim)`` unless the caller gave one): fixed at planning time
    scale: float

    @property
    def device(self) -> str:
        return self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"

    @classmethod
    def from_tensors(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: SparsePlan,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> AttentionProblem:
        """Check q/k/v (``[batch, seq, heads, head_dim]``) against the plan; raise :class:`GeometryError`.
        ``scale`` defaults to ``1/sqrt(head_dim)``."""
        cls._check_layout(q, k, v)
        if q.shape[1] != plan.seq_len:
            raise GeometryError(
                f"sequence length {q.shape[1]} does not match the plan: {plan.latent_frames} latent frames x "
                f"{plan.patches_per_frame} tokens per frame + {plan.text_tokens} text tokens = {plan.seq_len}"
            )
        return cls._make(q, k, plan, key_padding_mask, scale)

    @classmethod
    def for_ring(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: SparsePlan,
        shards: int,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> AttentionProblem:
        """The problem of ring attention whose ``shards`` ranks each hold one video shard q/k/v
        ``[batch, video_tokens / shards, heads, head_dim]`` (the text separately): the whole sequence's."""
        cls._check_layout(q, k, v)
        if q.shape[1] * shards != plan.video_tokens:
            raise GeometryError(
                f"ring shard of {q.shape[1]} tokens x {shards} shards != the plan's {plan.latent_frames} latent "
                f"frames x {plan.patches_per_frame} tokens = {plan.video_tokens} video tokens"
            )
        return cls._make(q, k, plan, key_padding_mask, scale)

    @staticmethod
    def _check_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise GeometryError(
                f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                f"{tuple(v.shape)}"
            )
        B, S, Hq, D = q.shape
        if k.shape != v.shape or k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
            raise GeometryError(f"k and v must be [{B}, {S}, heads_kv, {D}]; got {tuple(k.shape)}, {tuple(v.shape)}")
        Hkv = k.shape[2]
        if Hkv < 1 or Hq % Hkv:
            raise GeometryError(f"query heads {Hq} must be a multiple of key/value heads {Hkv} (GQA)")
        if not (q.device == k.device == v.device):
            raise GeometryError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
        if not (q.dtype == k.dtype == v.dtype):
            raise GeometryError(f"q, k, v have different dtypes: {q.dtype}, {k.dtype}, {v.dtype}")

    @classmethod
    def _make(cls, q: torch.Tensor, k: torch.Tensor, plan: SparsePlan, key_padding_mask: torch.Tensor | None,
              scale: float | None) -> AttentionProblem:
        B, _, Hq, D = q.shape
        if key_padding_mask is not None:
            if plan.text_tokens == 0:
                raise GeometryError("key_padding_mask was given but the plan has no text tokens")
            if tuple(key_padding_mask.shape) != (B, plan.text_tokens):
                raise GeometryError(
                    f"key_padding_mask must be [batch, text_tokens] = [{B}, {plan.text_tokens}] (True = keep); "
                    f"got {tuple(key_padding_mask.shape)}"
                )
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise GeometryError(f"scale must be a positive finite number; got {scale!r}")
        return cls(
            device_type=q.device.type,
            device_index=q.device.index,
            dtype=q.dtype,
            batch=B,
            seq_len=plan.seq_len,
            q_heads=Hq,
            kv_heads=k.shape[2],
            head_dim=D,
            text_tokens=plan.text_tokens,
            has_padding_mask=key_padding_mask is not None,
            scale=float(scale),
        )


@dataclass(frozen=True)
class Prepared:
    """What every driver's prepared state carries: the plan and the problem it was prepared for.
    A driver subclasses it with its own fields (index tensors, kernel wrappers, chosen strategy)."""

    plan: SparsePlan
    problem: AttentionProblem

    @property
    def scale(self) -> float:
        return self.problem.scale


PreparedT = TypeVar("PreparedT", bound=Prepared)


class Driver(ABC, Generic[PreparedT]):
    """Base class of attention drivers, registered under the ``lvsa.backends`` entry-point namespace.
    ``PreparedT`` is the driver's own :class:`Prepared` type."""

    name: ClassVar[str]
    #: higher wins under ``backend=auto``
    priority: ClassVar[int] = 0
    #: torch device types it runs on; ``None`` = any device torch supports
    devices: ClassVar[frozenset[str] | None] = None
    dtypes: ClassVar[frozenset[Any]] = frozenset()
    #: supported head dims; ``None`` = any
    head_dims: ClassVar[frozenset[int] | None] = None
    supports_gqa: ClassVar[bool] = True
    supports_text: ClassVar[bool] = True
    #: ``False`` keeps a driver out of ``backend=auto`` (the float64 reference is for tests)
    auto_select: ClassVar[bool] = True
    #: upper bound on the keys and values that one chunk of query frames gathers (split, gather and ring steps)
    gather_budget_bytes: ClassVar[int] = GATHER_BUDGET_BYTES
    #: the most batch entries one kernel call takes (``None``: no limit); ring steps batch query frames within it
    max_batch: ClassVar[int | None] = None

    def is_available(self, device_type: str) -> Availability:
        """Whether this driver can run on ``device_type`` here; subclasses add dependency checks."""
        if self.devices is not None and device_type not in self.devices:
            return Availability.no(f"runs on {', '.join(sorted(self.devices))}, not {device_type}")
        return Availability.yes()

    def check(self, problem: AttentionProblem) -> list[str]:
        """Why this driver cannot run ``problem``; empty when it can."""
        reasons = []
        if self.dtypes and problem.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            reasons.append(f"dtype {str(problem.dtype).removeprefix('torch.')} not in {names}")
        if self.head_dims is not None and problem.head_dim not in self.head_dims:
            reasons.append(f"head_dim {problem.head_dim} not in {sorted(self.head_dims)}")
        if not self.supports_gqa and problem.q_heads != problem.kv_heads:
            reasons.append(f"no GQA ({problem.q_heads} query heads, {problem.kv_heads} key/value heads)")
        if not self.supports_text and problem.text_tokens:
            reasons.append("no text tokens in the sequence")
        return reasons

    def capabilities(self) -> str:
        devices = "any" if self.devices is None else ",".join(sorted(self.devices))
        dtypes = ",".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes)) or "any"
        dims = "any" if self.head_dims is None else ",".join(map(str, sorted(self.head_dims)))
        return f"devices={devices} dtypes={dtypes} head_dims={dims} gqa={self.supports_gqa} text={self.supports_text}"

    # -- ring attention ----------------------------------------------------------------------------
    def check_lse(self, problem: AttentionProblem) -> list[str]:
        """Why this driver cannot run the ring steps of ``problem``; empty when it can. A ring step needs
        :meth:`attend_with_lse`: attention over a gathered key set that also returns its log-sum-exp, which
        ring attention merges across steps. Drivers without it are refused under ring attention."""
        return [f"{self.name} returns no log-sum-exp over a gathered key set (ring attention merges them)"]

    def attend_with_lse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [B, S, Hq, D], lse [B, Hq, S] float32, natural log)`` of q against k/v ``[B, L, Hkv, D]``;
        ``key_mask`` ``[B, L]`` (True = keep) or None. A sample that keeps no key comes back with lse -inf and
        a zero output. Only called when :meth:`check_lse` is empty."""
        raise NotImplementedError(f"{self.name}: no attention with log-sum-exp")

    @abstractmethod
    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> PreparedT:
        """Host-side work for one plan and problem (index tensors, kernel plans, the scale). Cached by dispatch."""

    @abstractmethod
    def run(
        self,
        prepared: PreparedT,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[batch, seq, q_heads, head_dim]`` in q's dtype, with ``prepared.scale``.
        No host work here."""
