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

from models import forward, small_wan
from vllm_omni.diffusion.data import AttentionConfig, AttentionSpec, OmniDiffusionConfig

WORKER = Path(__file__).parent / "support" / "ulysses_worker.py"


@pytest.mark.parametrize(("height", "width"), [(4, 4), (6, 2)], ids=["even", "padded"])
def test_two_ulysses_ranks_equal_one_process(tmp_path, height, width):
    tokens_per_frame = (height // 2) * (width // 2)
    steps = [0, 1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LVSA_")}
    out = tmp_path / "ranks.pt"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), str(WORKER), str(out), "41", str(height), str(width), "0,1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[LVSA] kfi=" in result.stdout + result.stderr
    ranks = torch.load(out)
    assert ranks["fallback_calls"] == 0 and ranks["sparse_calls"] == 2 * len(steps)
    assert (41 * tokens_per_frame) % 2 == (1 if height == 6 else 0)
    served = OmniDiffusionConfig(model_class_name="Wan22Pipeline",
                                 diffusion_attention_config=AttentionConfig(per_role={"self": AttentionSpec("LVSA")}))
    model = small_wan(served)
    latents = torch.randn(1, 4, 41, height, width, generator=torch.Generator().manual_seed(1))
    for step, parallel in zip(steps, ranks["outputs"], strict=True):
        torch.testing.assert_close(parallel, forward(model, served, latents, step=step), rtol=1e-4, atol=1e-4)
