"""``python -m lvsa_vllm_omni.serve``: lvsa's flags become LVSA_* variables, the per-role config selecting LVSA is
injected (merged into one the command has), and what cannot run is refused with one line and exit 2, before any
server starts. (The wrapper needs no vLLM-Omni to build the command: these run in every environment.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lvsa.errors import ConfigError
from lvsa_vllm_omni.serve import command


def _config(server: list[str]) -> dict:
    return json.loads(server[server.index("--diffusion-attention-config") + 1])


def test_flags_become_variables_and_the_backend_is_injected():
    server, variables = command(["/models/wan", "--sparsity-scale", "0.5", "--no-auto-keyframes",
                                 "--reference-latent-frames", "21", "--port", "8000"])
    assert server[:4] == ["vllm-omni", "serve", "/models/wan", "--omni"]
    assert "--port" in server and "8000" in server and "--sparsity-scale" not in server
    assert variables == {"LVSA_SPARSITY_SCALE": "0.5", "LVSA_AUTO_KEYFRAMES": "0", "LVSA_REFERENCE_LATENT_FRAMES": "21"}
    assert _config(server) == {"per_role": {"self": {"backend": "LVSA"}}}


def test_a_given_attention_config_is_merged_not_replaced():
    given = '{"per_role": {"cross": {"backend": "TORCH_SDPA"}}}'
    server, _ = command(["m", "--omni", f"--diffusion-attention-config={given}"])
    assert server.count("--omni") == 1
    assert _config(server) == {"per_role": {"cross": {"backend": "TORCH_SDPA"}, "self": {"backend": "LVSA"}}}


@pytest.mark.parametrize(("argv", "message"), [
    (["m", "--diffusion-attention-config", '{"per_role": {"self": {"backend": "FLASH_ATTN"}}}'],
     "selects 'FLASH_ATTN'"),
    (["m", "--diffusion-attention-config", "{not json"], "is not JSON"),
    (["m", "--ring-degree", "2"], "ring sequence parallelism"),
    (["m", "--allgather-degree=4"], "AllGather-KV"),
    (["m", "--sparsity-scale", "-1"], "LVSA_SPARSITY_SCALE"),
])
def test_what_cannot_run_is_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        command(argv)


def test_the_command_line_gives_one_line_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LVSA_")}  # not the suite's own
    result = subprocess.run([sys.executable, "-m", "lvsa_vllm_omni.serve", "m", "--ring-degree", "2"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stderr.startswith("lvsa_vllm_omni.serve: error: --ring-degree 2")
    dry = subprocess.run([sys.executable, "-m", "lvsa_vllm_omni.serve", "m", "--window-size", "8", "--dry-run"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert dry.returncode == 0 and "LVSA_WINDOW_SIZE=8" in dry.stdout
    assert "vllm-omni serve m --omni --dry-run --diffusion-attention-config" not in dry.stdout  # --dry-run is ours
