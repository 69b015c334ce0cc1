"""The driver contract: what an attention driver declares, and the two calls it answers.

A driver is small. It declares what it supports (devices, dtypes, head dims, GQA, text tokens), says
whether it can run on a device and why not (:meth:`Driver.is_available`, never raising, never compiling),
turns a plan into whatever it needs on the device (:meth:`Driver.prepare`: host work, done once per plan
change and cached by the dispatcher), and runs (:meth:`Driver.run`: no host work, called by every layer)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import GeometryError

if TYPE_CHECKING:
    import torch

    from .plan import SparsePlan


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
    ) -> AttentionProblem:
        """Check q/k/v (``[batch, seq, heads, head_dim]``) against the plan; raise :class:`GeometryError`."""
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
        if S != plan.seq_len:
            raise GeometryError(
                f"sequence length {S} does not match the plan: {plan.latent_frames} latent frames x "
                f"{plan.patches_per_frame} tokens per frame + {plan.text_tokens} text tokens = {plan.seq_len}"
            )
        if not (q.device == k.device == v.device):
            raise GeometryError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
        if not (q.dtype == k.dtype == v.dtype):
            raise GeometryError(f"q, k, v have different dtypes: {q.dtype}, {k.dtype}, {v.dtype}")
        if key_padding_mask is not None:
            if plan.text_tokens == 0:
                raise GeometryError("key_padding_mask was given but the plan has no text tokens")
            if tuple(key_padding_mask.shape) != (B, plan.text_tokens):
                raise GeometryError(
                    f"key_padding_mask must be [batch, text_tokens] = [{B}, {plan.text_tokens}] (True = keep); "
                    f"got {tuple(key_padding_mask.shape)}"
                )
        return cls(
            device_type=q.device.type,
            device_index=q.device.index,
            dtype=q.dtype,
            batch=B,
            seq_len=S,
            q_heads=Hq,
            kv_heads=Hkv,
            head_dim=D,
            text_tokens=plan.text_tokens,
            has_padding_mask=key_padding_mask is not None,
        )


class Driver(ABC):
    """Base class of attention drivers, registered under the ``lvsa.backends`` entry-point namespace."""

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

    @abstractmethod
    def prepare(self, plan: SparsePlan, problem: AttentionProblem) -> Any:
        """Host-side work for one plan and problem shape (index tensors, kernel plans). Cached by dispatch."""

    @abstractmethod
    def run(
        self,
        prepared: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention output ``[batch, seq, q_heads, head_dim]`` in q's dtype. No host work here."""
