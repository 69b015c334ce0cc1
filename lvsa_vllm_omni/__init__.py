"""lvsa inside vLLM-Omni: the diffusion attention backend ``LVSA`` (a second host beside diffusers).

- :mod:`.plugin`: the ``vllm_omni.general_plugins`` entry point; registers the backend name ``LVSA`` in every
  process, idempotently.
- :mod:`.backend`: vLLM-Omni's backend contract (``AttentionBackend`` / ``AttentionImpl``), thin: it refuses
  what lvsa cannot run honestly (ring and AllGather-KV sequence parallelism, causal attention) and hands every
  call to :mod:`.host`.
- :mod:`.host`: geometry and step from vLLM-Omni's metadata (``video_layout``, the forward context's
  denoising step), the served model's reference horizon, one context per forward, and the call through
  lvsa's executor (:func:`lvsa.attention.execute`), behind a custom op under ``torch.compile``.
- :mod:`.serve`: ``python -m lvsa_vllm_omni.serve <model> ...`` runs ``vllm-omni serve`` with the per-role
  attention config injected and lvsa's flags turned into ``LVSA_*`` variables.

Tested against vLLM-Omni 0.30 (the ``lvsa[vllm-omni]`` extra pins that minor)."""

#: the name vLLM-Omni selects lvsa by (``--diffusion-attention-config '{"per_role": {"self": {"backend": "LVSA"}}}'``)
BACKEND_NAME = "LVSA"
