"""The vLLM-Omni integration's tests run against the real vLLM-Omni code (``tox -e vllm-omni``).

Where vLLM-Omni is not installed (``tox -e py``) they are skipped with that reason; ``LVSA_TEST_VLLM_OMNI=1``
(set by the ``vllm-omni`` tox environment) makes its absence a failure. The CPU needs two things vLLM-Omni
lacks, both test support under ``support/``: a diffusion platform for CPU, and import-only stand-ins for the
CUDA builds of torchvision and torchaudio that the package index offers."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "support"
REQUIRED = os.environ.get("LVSA_TEST_VLLM_OMNI") == "1"
AVAILABLE = importlib.util.find_spec("vllm_omni") is not None

if not AVAILABLE and REQUIRED:
    raise RuntimeError("LVSA_TEST_VLLM_OMNI=1 but vllm_omni is not installed (tox -e vllm-omni installs it)")
if AVAILABLE:
    for name in ("torchvision", "torchaudio"):
        if importlib.util.find_spec(name) is None:
            sys.path.insert(0, str(SUPPORT / "stand_ins"))
            break
    sys.path.insert(0, str(SUPPORT))
    # before any vLLM-Omni module binds the platform it finds at import (its parallel state does)
    import vllm_omni.platforms
    from cpu_platform import CpuTestOmniPlatform

    vllm_omni.platforms._current_omni_platform = CpuTestOmniPlatform()


@pytest.fixture(autouse=True)
def cpu_platform(monkeypatch):
    """vLLM-Omni's current platform is the tests' CPU platform, and lvsa's serving host starts afresh."""
    if not AVAILABLE:  # only the serve wrapper's tests run without vLLM-Omni
        yield
        return
    import vllm_omni.platforms as platforms
    from cpu_platform import CpuTestOmniPlatform

    from lvsa_vllm_omni import host
    from lvsa_vllm_omni.plugin import register

    register()
    monkeypatch.setattr(platforms, "_current_omni_platform", CpuTestOmniPlatform())
    from vllm_omni.diffusion.attention import selector

    selector._cached_get_backend_cls.cache_clear()
    host.reset_host()
    yield
    host.reset_host()
