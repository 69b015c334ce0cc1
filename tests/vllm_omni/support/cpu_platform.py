"""Test support only: a vLLM-Omni platform for diffusion on CPU, which vLLM-Omni 0.30 lacks.

vLLM-Omni's unspecified platform resolves no diffusion attention backend, and its attention implementations
dispatch only to accelerator methods. This platform resolves backends after vLLM-Omni's own validation and
maps ``TORCH_SDPA`` (the default) to vLLM-Omni's SDPA implementation called directly, so the CPU tests can
compare lvsa with vLLM-Omni's own dense attention. Never shipped, never selected outside the tests."""

from __future__ import annotations

from vllm_omni.platforms.interface import UnspecifiedOmniPlatform


class CpuTestOmniPlatform(UnspecifiedOmniPlatform):
    device_type = "cpu"

    @classmethod
    def get_diffusion_attn_backend_cls(cls, selected_backend, head_size, allow_trtllm_default=False) -> str:
        from vllm_omni.diffusion.attention.backends.registry import DiffusionAttentionBackendEnum

        name = (selected_backend or "TORCH_SDPA").upper()
        if name == "TORCH_SDPA":
            return "cpu_sdpa.CpuSdpaBackend"  # a module of its own: the backends import the platform
        cls.validate_diffusion_attn_backend(name)
        return DiffusionAttentionBackendEnum[name].get_path()

    dist_backend = "gloo"

    @classmethod
    def get_device_count(cls) -> int:
        return 1

    # the worker's device questions, answered for the CPU
    @classmethod
    def set_device(cls, device) -> None:
        return None

    @classmethod
    def empty_cache(cls) -> None:
        return None

    @classmethod
    def synchronize(cls, *args, **kwargs) -> None:
        return None

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "cpu"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        import psutil

        return psutil.virtual_memory().total

    @classmethod
    def get_free_memory(cls, device=None) -> int:
        import psutil

        return psutil.virtual_memory().available

    @classmethod
    def reset_peak_memory_stats(cls, *args, **kwargs) -> None:
        return None

    @classmethod
    def max_memory_allocated(cls, *args, **kwargs) -> int:
        return 0

    @classmethod
    def max_memory_reserved(cls, *args, **kwargs) -> int:
        return 0

    @classmethod
    def record_device_event(cls):
        return None

    @classmethod
    def supports_torch_inductor(cls) -> bool:
        return True
