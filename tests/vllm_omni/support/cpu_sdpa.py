"""Test support: vLLM-Omni's SDPA implementation called directly, the dense baseline of the CPU tests (vLLM-Omni's
own implementation dispatches only to accelerator methods)."""

from __future__ import annotations

from vllm_omni.diffusion.attention.backends.sdpa import SDPABackend, SDPAImpl


class CpuSdpaImpl(SDPAImpl):
    def forward(self, query, key, value, attn_metadata=None):
        return self._forward_impl(query, key, value, attn_metadata)


class CpuSdpaBackend(SDPABackend):
    @staticmethod
    def get_impl_cls():
        return CpuSdpaImpl
