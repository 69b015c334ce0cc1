"""vLLM-Omni's diffusion attention backend contract for lvsa: ``LVSA``.

The backend says what it needs (``validate_available``: an lvsa driver for the platform's device) and refuses
what would run dense without a word: ring and AllGather-KV sequence parallelism (vLLM-Omni's ring path bypasses
backends and runs its own dense kernels) and causal attention. Ulysses works: the backend sees the whole
sequence with a share of the heads. The implementation overrides ``forward`` (not the per-platform methods), so
it runs on every platform vLLM-Omni runs on; the work is :mod:`.host`'s."""

from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.attention.backends.abstract import AttentionBackend, AttentionImpl, AttentionMetadata

from . import BACKEND_NAME
from .host import _SELF_ATTENTION, attention_op, current_step, host, install_transformer_hooks, joint_attention_op


def _platform_device() -> str:
    from vllm_omni.platforms import current_omni_platform

    return getattr(current_omni_platform, "device_type", None) or "cpu"


class LVSAAttentionBackend(AttentionBackend):
    accept_output_buffer = False
    # the impl keeps the first used_len tokens itself, so padded layouts need no mask
    supports_prefix_kv_slicing = True

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[LVSAAttentionImpl]:
        return LVSAAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[AttentionMetadata]:
        return AttentionMetadata

    @staticmethod
    def get_builder_cls():
        return None

    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return []  # what the chosen lvsa driver takes; checked per call with the driver's reason

    @classmethod
    def supports_attention_mask(cls, attention_spec: object | None = None) -> bool:
        return True  # padding-only masks (sequence parallelism's tail), which the layout's used_len describes

    @classmethod
    def validate_available(cls) -> None:
        """Raise, naming what is missing, when no lvsa driver can run on the platform's device."""
        from lvsa.driver_status import available_drivers, status_table

        device = _platform_device()
        rows = [row for row in available_drivers(device) if row.available and row.name != "reference"]
        if not rows:
            raise ValueError(f"LVSA: no lvsa driver can run on {device} here:\n{status_table(device, None)}")


def _refuse_sequence_parallelism_that_bypasses_backends() -> None:
    from vllm_omni.diffusion.config import get_current_diffusion_config_or_none

    parallel = getattr(get_current_diffusion_config_or_none(), "parallel_config", None)
    ring = getattr(parallel, "ring_degree", 1) or 1
    allgather = getattr(parallel, "allgather_degree", 1) or 1
    if ring > 1:
        raise ValueError(f"LVSA does not run under ring sequence parallelism (ring_degree={ring}): vLLM-Omni's ring "
                         "path bypasses attention backends and would run dense attention. Use Ulysses "
                         "(--ulysses-degree) with ring_degree 1")
    if allgather > 1:
        raise ValueError(f"LVSA does not run under AllGather-KV sequence parallelism (allgather_degree={allgather}): "
                         "use Ulysses (--ulysses-degree) instead")


class LVSAAttentionImpl(AttentionImpl):
    """One vLLM-Omni attention layer through lvsa (``[B, S, H, D]`` tensors)."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", qkv_layout: str | None = None,
                 backend_kwargs: dict[str, Any] | None = None, **extra_impl_args: Any) -> None:
        role = extra_impl_args.get("role", "self")
        if causal:
            raise ValueError(f"LVSA does not run causal attention (role={role!r}, {prefix or 'a layer'}): select "
                             "another backend for that role")
        if qkv_layout is not None and qkv_layout.upper() != "BSND":
            raise ValueError(f"LVSA needs [batch, seq, heads, head_dim] tensors; {prefix or 'a layer'} declares "
                             f"qkv_layout={qkv_layout!r}")
        if backend_kwargs:
            raise ValueError(f"LVSA takes no per-role options ({', '.join(backend_kwargs)}): lvsa's knobs are LVSA_* "
                             "variables (see `python -m lvsa_vllm_omni.serve --help`)")
        _refuse_sequence_parallelism_that_bypasses_backends()
        install_transformer_hooks()
        self.num_heads = num_heads
        self.head_size = head_size
        self.softmax_scale = softmax_scale
        self.layer = prefix or _SELF_ATTENTION

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        layout = attn_metadata.video_layout if attn_metadata is not None else None
        if layout is None or layout.latent_grid is None:
            return self._joint(query, key, value, attn_metadata)
        if len(layout.video_spans) > 1:
            return host().dense(self.layer, "several_videos", f"{len(layout.video_spans)} video spans in one "
                                 "sequence", query, key, value, self.softmax_scale)
        mask = attn_metadata.attn_mask
        if attn_metadata.full_attn_spans is not None or attn_metadata.query_ranges is not None or (
                mask is not None and not (mask.ndim == 2 and mask.dtype == torch.bool)):
            return host().dense(self.layer, "unsupported_mask", "a mask other than sequence parallelism's padding",
                                 query, key, value, self.softmax_scale)
        grid = [int(x) for x in layout.latent_grid]
        prefix_len = int(layout.prefix_len or 0)
        used_len = int(layout.used_len) if layout.used_len is not None else prefix_len + grid[0] * grid[1] * grid[2]
        if torch.compiler.is_compiling():  # the step is read inside the op, at run time: no guard on it
            return attention_op(query, key, value, grid, prefix_len, used_len, self.softmax_scale)
        return host().attend(self.layer, query, key, value, (grid[0], grid[1], grid[2]), prefix_len, used_len,
                              current_step(), self.softmax_scale)

    def _joint(self, query, key, value, attn_metadata):
        """A call without ``video_layout``: the video of the forward the transformer's hook reported, then text
        (HunyuanVideo 1.5), or, for a model lvsa does not hook, the policy's error or loud dense call."""
        serving = host()
        if serving.forward is None:
            return serving.dense(self.layer, "no_video_layout", "this call carries no video_layout and its "
                                 "transformer reported no grid, so lvsa cannot find its frames", query, key, value,
                                 self.softmax_scale)
        text_tokens = None
        if attn_metadata is not None and attn_metadata.joint_query is not None:
            # Ulysses: vLLM-Omni joined the text (this rank's heads) to the gathered video, after its padding
            if attn_metadata.joint_strategy != "rear":
                return serving.dense(self.layer, "joint_text_before", "text joined before the video under "
                                     "sequence parallelism", query, key, value, self.softmax_scale)
            text_tokens = int(attn_metadata.joint_query.shape[1])
        if attn_metadata is not None and attn_metadata.full_attn_spans is not None:
            return serving.dense(self.layer, "unsupported_mask", "piecewise attention spans", query, key, value,
                                 self.softmax_scale)
        mask = attn_metadata.attn_mask if attn_metadata is not None else None
        if mask is not None and not (mask.ndim == 2 and mask.shape[1] == query.shape[1]):
            return serving.dense(self.layer, "unsupported_mask", f"a mask of shape {tuple(mask.shape)}, not "
                                 "[batch, seq]", query, key, value, self.softmax_scale)
        if torch.compiler.is_compiling():
            return joint_attention_op(query, key, value, mask, self.softmax_scale,
                                      -1 if text_tokens is None else text_tokens)
        return serving.attend_joint(self.layer, query, key, value, mask, self.softmax_scale, text_tokens)
