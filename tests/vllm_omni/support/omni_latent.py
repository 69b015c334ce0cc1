"""Test support: vLLM-Omni's Python API (the ``Omni`` engine) with lvsa as the self-attention backend, asking for
the latent (``output_type="latent"``); prints the latent's shape and saves it (run by test_serve_end_to_end.py)."""

from __future__ import annotations

import sys


def main(checkpoint: str, out: str) -> None:
    import torch
    from vllm_omni import Omni
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    omni = Omni(model=checkpoint, dtype="float32", enforce_eager=True,
                diffusion_attention_config={"per_role": {"self": {"backend": "LVSA"}}})
    params = OmniDiffusionSamplingParams(height=32, width=32, num_frames=161, num_inference_steps=2,
                                         guidance_scale=2.0, seed=0, output_type="latent")
    outputs = omni.generate(["a cat walks on the beach"], [params])
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "__dict__"):
            walk(vars(value))

    walk(outputs)
    latent = max(found, key=lambda t: t.numel())
    print("LATENT_SHAPE", tuple(latent.shape))
    torch.save(latent, out)
    omni.close() if hasattr(omni, "close") else None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
