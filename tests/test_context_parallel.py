"""Context parallelism (Ulysses through diffusers) on CPU: 2 and 4 gloo processes give the single-process output."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lvsa
from lvsa.adapters import adapter_named
from lvsa.parallel import UlyssesGroup
from lvsa_app.generation import _load_pipeline, main
from lvsa_app.models import example_model

FAMILIES = ["wan", "hunyuan", "cogvideox"]
CPU_DRIVERS = ["sdpa", "reference"]
FRAMES = {"wan": 161, "hunyuan": 257, "cogvideox": 97}  # beyond the horizon: sparse plans
WORKER = Path(__file__).with_name("distributed_worker.py")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in FAMILIES:
        torch.manual_seed(0)
        example_model(name).tiny_pipeline().save_pretrained(root / name)
    return root


def single_process(models: Path, name: str, backend: str) -> torch.Tensor:
    adapter = adapter_named(name)
    example = example_model(adapter.name)
    pipe = _load_pipeline(adapter, str(models / name), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lvsa.apply(pipe, lvsa.LVSASettings(backend=backend))
    call = {**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0),
            "height": 64, "width": 64, "num_frames": FRAMES[name], "num_inference_steps": 2,
            "generator": torch.Generator().manual_seed(0), "output_type": "latent"}
    with torch.inference_mode():
        return pipe(**call).frames


def torchrun(processes: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.mark.parametrize("processes", [2, 4])
def test_context_parallel_equals_one_process(saved_models, tmp_path, processes):
    frames = ",".join(f"{name}={count}" for name, count in FRAMES.items())
    result = torchrun(processes, str(WORKER), str(saved_models), str(tmp_path), ",".join(FAMILIES),
                      ",".join(CPU_DRIVERS), frames, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in FAMILIES:
        for backend in CPU_DRIVERS:
            parallel = torch.load(tmp_path / f"{name}-{backend}.pt")
            assert parallel["ulysses_degree"] == processes and parallel["sparse_calls"] > 0
            assert parallel["density"] < 1
            assert parallel["collective_backend"] == "gloo"  # chosen by the cpu device module
            expected = single_process(saved_models, name, backend)
            torch.testing.assert_close(parallel["latent"], expected, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, n=name, b=backend: f"{n} with {b}: {m}")


def test_the_example_runs_under_torchrun(saved_models, tmp_path):
    common = ["--model", str(saved_models / "wan"), "--num-frames", "161", "--steps", "2", "--lvsa",
              "--output-latent", "--output-dir", str(tmp_path)]
    result = torchrun(2, str(EXAMPLES / "wan_generate.py"), *common, "--ulysses-degree", "2",
                      "--output-name", "parallel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("output:") == 1 and "rank 1: [LVSA] memory" in result.stdout  # rank 0 speaks
    assert result.stderr.count("[LVSA] kfi=") == 1  # only rank 0 logs the [LVSA] lines
    assert main("wan", [*common, "--output-name", "single"]) == 0
    parallel, single = (torch.load(tmp_path / f"{n}.pt")["latent"] for n in ("parallel", "single"))
    torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-4)
    assert [p.name for p in tmp_path.glob("*.memory.json")]  # the gathered report, written once per run


def test_a_degree_that_does_not_divide_the_heads_is_refused(saved_models):
    pipe = _load_pipeline(adapter_named("wan"), str(saved_models / "wan"), torch.float32)
    with pytest.raises(lvsa.ConfigError, match="4 attention heads, which do not split over ulysses_degree=3"):
        adapter_named("wan").check_context_parallel(pipe.transformer, 3)


def test_a_sequence_that_does_not_split_is_refused():
    group = UlyssesGroup(group=None, degree=4, rank=0)
    with pytest.raises(lvsa.GeometryError, match="21 latent frames x 1561 tokens = 32781 video tokens"):
        group.check_tokens(21 * 1561, 21, 1561)


def test_the_degree_must_match_the_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main("wan", ["--lvsa", "--ulysses-degree", "2", "--steps", "1"]) == 2
    assert "launched with 1 process(es) but --ulysses-degree 2" in capsys.readouterr().err
