"""Test support: the ``vllm_omni.platform_plugins`` entry point of the CPU test platform, active only where
``VLLM_OMNI_CPU_TEST_PLATFORM=1`` (the end-to-end tests set it for the processes they start)."""

from __future__ import annotations

import os


def activate() -> str | None:
    return "cpu_platform.CpuTestOmniPlatform" if os.environ.get("VLLM_OMNI_CPU_TEST_PLATFORM") == "1" else None
