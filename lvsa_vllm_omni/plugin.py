"""The ``vllm_omni.general_plugins`` entry point: vLLM-Omni calls :func:`register` once in every process (the
engine's argument parsing, the stage process, each diffusion worker). vLLM-Omni's backend names are a closed
enum; ``aenum.extend_enum`` (a dependency of vLLM-Omni, which extends the same enum itself) adds ``LVSA``."""

from __future__ import annotations

import logging

from . import BACKEND_NAME

BACKEND_CLASS = "lvsa_vllm_omni.backend.LVSAAttentionBackend"


def register() -> None:
    """Add ``LVSA`` to vLLM-Omni's diffusion attention backends (a second call changes nothing), and send lvsa's
    ``[LVSA]`` lines to the server's log."""
    from aenum import extend_enum
    from vllm_omni.diffusion.attention.backends.registry import DiffusionAttentionBackendEnum

    from lvsa.log import logger, setup_logging

    if BACKEND_NAME not in DiffusionAttentionBackendEnum.__members__:
        extend_enum(DiffusionAttentionBackendEnum, BACKEND_NAME, BACKEND_CLASS)
    if not logger.handlers and not logging.getLogger().handlers:
        setup_logging()
    elif not logger.handlers:
        logger.setLevel(logging.INFO)
