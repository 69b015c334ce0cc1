"""vLLM-Omni's Wan transformer under its Ulysses sequence parallelism over two gloo processes, lvsa as the
self-attention backend: each rank sees the whole sequence for half of the heads, and the result equals one
process, for a length that splits evenly and for one that needs vLLM-Omni's padding (left out by lvsa)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm_omni", reason="vLLM-Omni is not installed (tox -e vllm-omni)")

from models import forward, hunyuan_forward, small_hunyuan, small_wan
from vllm_omni.diffusion.data import AttentionConfig, AttentionSpec, OmniDiffusionConfig

WORKER = Path(__file__).parent / "support" / "ulysses_worker.py"


def _run_ranks(tmp_path, *argv) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LVSA_")}
    out = tmp_path / "ranks.pt"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), str(WORKER), str(out), *map(str, argv)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[LVSA] kfi=" in result.stdout + result.stderr
    return torch.load(out)


@pytest.mark.parametrize(("height", "width"), [(4, 4), (6, 2)], ids=["even", "padded"])
def test_two_ulysses_ranks_equal_one_process(tmp_path, height, width):
    tokens_per_frame = (height // 2) * (width // 2)
    steps = [0, 1]
    ranks = _run_ranks(tmp_path, "wan", 41, height, width, "0,1")
    assert ranks["fallback_calls"] == 0 and ranks["sparse_calls"] == 2 * len(steps)
    assert (41 * tokens_per_frame) % 2 == (1 if height == 6 else 0)
    served = OmniDiffusionConfig(model_class_name="Wan22Pipeline",
                                 diffusion_attention_config=AttentionConfig(per_role={"self": AttentionSpec("LVSA")}))
    model = small_wan(served)
    latents = torch.randn(1, 4, 41, height, width, generator=torch.Generator().manual_seed(1))
    for step, parallel in zip(steps, ranks["outputs"], strict=True):
        torch.testing.assert_close(parallel, forward(model, served, latents, step=step), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("height", "width"), [(4, 4), (3, 3)], ids=["even", "padded"])
def test_hunyuan_text_beside_the_video_under_ulysses_equals_one_process(tmp_path, height, width):
    """HunyuanVideo 1.5 under Ulysses: vLLM-Omni joins each rank's heads of the (padded) text after the gathered
    video and its padding; lvsa plans the video, attends the text with its padding mask, leaves the padding out."""
    ranks = _run_ranks(tmp_path, "hunyuan", 41, height, width, "0,1")
    assert ranks["fallback_calls"] == 0 and ranks["sparse_calls"] == 4
    served = OmniDiffusionConfig(model_class_name="HunyuanVideo15Pipeline",
                                 diffusion_attention_config=AttentionConfig(per_role={"self": AttentionSpec("LVSA")}))
    model = small_hunyuan(served)
    latents = torch.randn(2, 9, 41, height, width, generator=torch.Generator().manual_seed(1))
    for step, parallel in enumerate(ranks["outputs"]):
        torch.testing.assert_close(parallel, hunyuan_forward(model, served, latents, 900.0 - 100 * step),
                                   rtol=1e-4, atol=1e-4)
