"""Context parallelism (Ulysses through diffusers) on CPU: 2 and 4 gloo processes give the single-process output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lvsa
from lvsa.adapters import adapter_named
from lvsa.backends.reference import token_mask
from lvsa.parallel import ContextParallel, RingGroup, UlyssesGroup
from lvsa_app.generation import load_pipeline, main
from lvsa_app.models import example_model

FAMILIES = ["wan", "hunyuan", "cogvideox"]
CPU_DRIVERS = ["sdpa", "reference"]
FRAMES = {"wan": 161, "hunyuan": 257, "cogvideox": 97}  # beyond the horizon: sparse plans
#: (ulysses_degree, ring_degree): Ulysses 2 and 4, ring 2 and 4, Ulysses 2 x ring 2 (4 processes)
LAYOUTS = [(2, 1), (4, 1), (1, 2), (1, 4), (2, 2)]
SPARSITY_SCALE = 0.5  # fewer global frames: 4 ring shards of the CogVideoX plan skip steps
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
    pipe = load_pipeline(adapter, str(models / name), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lvsa.apply(pipe, lvsa.LVSASettings(backend=backend, sparsity_scale=SPARSITY_SCALE))
    call = {**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0),
            "height": 64, "width": 64, "num_frames": FRAMES[name], "num_inference_steps": 2,
            "generator": torch.Generator().manual_seed(0), "output_type": "latent"}
    with torch.inference_mode():
        return pipe(**call).frames


@pytest.fixture(scope="module")
def one_process(saved_models):
    """The single-process latents, computed once for every layout."""
    return {(name, backend): single_process(saved_models, name, backend)
            for name in FAMILIES for backend in CPU_DRIVERS}


@pytest.mark.parametrize(("ulysses", "ring"), LAYOUTS, ids=[f"ulysses{u}-ring{r}" for u, r in LAYOUTS])
def test_context_parallel_equals_one_process(saved_models, one_process, tmp_path, ulysses, ring, torchrun):
    processes = ulysses * ring
    frames = ",".join(f"{name}={count}" for name, count in FRAMES.items())
    result = torchrun(processes, str(WORKER), str(saved_models), str(tmp_path), ",".join(FAMILIES),
                      ",".join(CPU_DRIVERS), frames, str(ulysses), str(ring), str(SPARSITY_SCALE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    skipped = 0
    for name in FAMILIES:
        for backend in CPU_DRIVERS:
            ranks = [torch.load(tmp_path / f"{name}-{backend}-rank{r}.pt", weights_only=False)
                     for r in range(processes)]
            parallel = ranks[0]
            assert (parallel["ulysses_degree"], parallel["ring_degree"]) == (ulysses, ring)
            assert parallel["sparse_calls"] > 0 and parallel["density"] < 1
            assert parallel["collective_backend"] == "gloo"  # chosen by the cpu device module
            torch.testing.assert_close(parallel["latent"], one_process[name, backend], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, n=name, b=backend: f"{n} with {b}: {m}")
            for rank, stats in enumerate(ranks):
                # every layer call ran ring_degree steps; the last one skipped exactly the key shards with
                # no attended (query, key) pair in the reference's token mask (rank r * U + u holds ring shard r)
                assert stats["ring_steps"] == (ring * stats["sparse_calls"] if ring > 1 else 0)
                expected = token_mask_skips(stats["plan"], ring)[rank // ulysses] if ring > 1 else ()
                assert stats["last_skipped_key_shards"] == expected, (name, backend, rank)
                skipped += stats["ring_steps_skipped"]
    if ring == 4:
        assert skipped > 0  # the counts above are not vacuous: 4 shards of CogVideoX's plan skip steps


def token_mask_skips(plan, shards: int) -> list[tuple[int, ...]]:
    """Per ring rank, the key shards with no attended pair, from the float64 reference's token mask."""
    mask = token_mask(plan)
    vs, size = plan.video_start, plan.video_tokens // shards
    return [tuple(j for j in range(shards)
                  if not mask[vs + i * size : vs + (i + 1) * size, vs + j * size : vs + (j + 1) * size].any())
            for i in range(shards)]


@pytest.mark.parametrize("degree", ["--ulysses-degree", "--ring-degree"])
def test_the_example_runs_under_torchrun(saved_models, tmp_path, degree, torchrun):
    common = ["--model", str(saved_models / "wan"), "--num-frames", "161", "--steps", "2", "--lvsa",
              "--output-latent", "--output-dir", str(tmp_path)]
    result = torchrun(2, str(EXAMPLES / "wan_generate.py"), *common, degree, "2",
                      "--output-name", "parallel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    layout = "Ulysses 2 x ring 1" if degree == "--ulysses-degree" else "Ulysses 1 x ring 2"
    assert f"context parallel over 2 processes: {layout} (gloo)" in result.stdout
    assert ("ring attention (rank 0): 0 of" in result.stdout) == (degree == "--ring-degree")
    assert result.stdout.count("output:") == 1 and "rank 1: [LVSA] memory" in result.stdout  # rank 0 speaks
    assert result.stderr.count("[LVSA] kfi=") == 1  # only rank 0 logs the [LVSA] lines
    assert main("wan", [*common, "--output-name", "single"]) == 0
    parallel, single = (torch.load(tmp_path / f"{n}.pt")["latent"] for n in ("parallel", "single"))
    torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-4)
    assert [p.name for p in tmp_path.glob("*.memory.json")]  # the gathered report, written once per run


def test_dense_warmup_and_dense_layers_under_context_parallelism(saved_models, tmp_path, torchrun):
    """A dense step or layer runs dense attention over the whole sequence for this rank's heads (the Ulysses
    exchange around a dense plan): the same latent as one process with the same settings."""
    degree = "--ulysses-degree"
    common = ["--model", str(saved_models / "wan"), "--num-frames", "161", "--steps", "2", "--lvsa",
              "--output-latent", "--output-dir", str(tmp_path), "--dense-warmup-steps", "1", "--dense-layers", "0"]
    result = torchrun(2, str(EXAMPLES / "wan_generate.py"), *common, degree, "2", "--output-name", "parallel",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[LVSA] dense warm-up: step 0 of 2 runs dense, 1 sparse" in result.stderr
    assert "of them dense: warm-up steps, dense layers" in result.stdout
    assert main("wan", [*common, "--output-name", "single"]) == 0
    parallel, single = (torch.load(tmp_path / f"{n}.pt")["latent"] for n in ("parallel", "single"))
    torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-4)


def test_a_degree_that_does_not_divide_the_heads_is_refused(saved_models):
    pipe = load_pipeline(adapter_named("wan"), str(saved_models / "wan"), torch.float32)
    with pytest.raises(lvsa.ConfigError, match="4 attention heads, which do not split over ulysses_degree=3"):
        adapter_named("wan").check_context_parallel(pipe.transformer, 3)


def test_a_sequence_that_does_not_split_is_refused():
    layout = ContextParallel(UlyssesGroup(group=None, degree=2, rank=0), RingGroup(group=None, degree=2, rank=0))
    with pytest.raises(lvsa.GeometryError, match=r"21 latent frames x 1561 tokens = 32781 video tokens do not split "
                       r"into 4 equal shards \(ulysses_degree=2 x ring_degree=2\)"):
        layout.check_tokens(21 * 1561, 21, 1561)


def test_the_degree_must_match_the_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main("wan", ["--lvsa", "--ulysses-degree", "2", "--steps", "1"]) == 2
    assert "launched with 1 process(es) but --ulysses-degree 2" in capsys.readouterr().err


def test_a_process_that_joined_no_group_exits_as_python_does():
    """``exit_process`` skips the interpreter's finalization only where a process group was joined (the
    torchrun tests above end through that path, their output and files checked)."""
    from lvsa.parallel import exit_process

    with pytest.raises(SystemExit) as stopped:
        exit_process(3)
    assert stopped.value.code == 3
