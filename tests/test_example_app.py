"""The example scripts never report a failure as success, and check what they are given before any model is
loaded: failed encodes, interrupted writes, output locations, names, numbers, settings, flags without
effect, collective timeouts."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lvsa
from lvsa.errors import GeometryError
from lvsa_app.generation import main
from lvsa_app.models import example_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the example gets as far as building or loading a model."""
    import lvsa_app.generation as generation

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    for name in ("wan", "hunyuan", "cogvideox"):
        monkeypatch.setattr(type(example_model(name)), "tiny_pipeline", refuse)
    monkeypatch.setattr(generation, "load_pipeline", refuse)


# -- bad numbers, names and places: one line, exit status 2, nothing loaded ------------------------------------

BAD = [
    (["--num-frames", "0"], "--num-frames 0: must be a positive integer"),
    (["--num-frames", "-5"], "--num-frames -5: must be a positive integer"),
    (["--num-frames", "2"], "--num-frames 2: wan takes 4k+1 frames; use 1 or 5"),
    (["--steps", "0"], "--steps 0: must be a positive integer"),
    (["--height", "0"], "--height 0: must be a positive integer"),
    (["--fps", "0"], "--fps 0: must be a positive integer"),
    (["--height", "100"], "--height 100: wan takes multiples of 16 pixels (VAE x patch); use 96 or 112"),
    (["--width", "70"], "--width 70: wan takes multiples of 16"),
    (["--output-name", "../../x"], "--output-name ../../x: a path may not leave the working directory"),
    (["--output-name", "/abs/clip.mp4"], "--output-name /abs/clip.mp4: give a name, or a path under the working "
     "directory; for another folder: --output-dir /abs --output-name clip.mp4"),
    (["--output-name", "sub/"], "--output-name 'sub/': give a file name, or a path"),
    (["--collective-timeout", "0"], "--collective-timeout 0.0: must be a positive number"),
    (["--collective-timeout", "inf"], "--collective-timeout inf: must be a positive number"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_fail_before_loading(argv, message, no_model_load, tmp_path, capsys):
    assert main("wan", ["--output-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_output_locations_are_checked_before_loading(no_model_load, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main("wan", ["--output-dir", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main("wan", ["--output-dir", str(a_file / "below")]) == 2
    assert "cannot write in" in capsys.readouterr().err
    (tmp_path / "taken.mp4").mkdir()
    assert main("wan", ["--output-dir", str(tmp_path), "--output-name", "taken"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_one_flag_per_setting(no_model_load, monkeypatch, capsys):
    from lvsa_app.generation import build_parser

    flags = {option for action in build_parser("wan")._actions for option in action.option_strings}
    assert "--height" in flags and "--video-height" not in flags and "--video-width" not in flags
    # the original tool's flags, which the application (not the library) owns
    assert {"--lvsa", "--no-lvsa", "--flashinfer"} <= flags
    monkeypatch.setenv("LVSA_VIDEO_HEIGHT", "480")
    assert main("wan", ["--height", "64"]) == 2
    assert "LVSA_VIDEO_HEIGHT=480 is set" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["env", "flag", "configure"])
def test_non_finite_sparsity_scale_is_rejected(where, monkeypatch, capsys):
    if where == "configure":
        with pytest.raises(ValueError, match="sparsity_scale"):
            lvsa.LVSASettings(sparsity_scale=math.inf)
        return
    argv = ["--lvsa", "--num-frames", "9", "--steps", "1"]
    if where == "env":
        monkeypatch.setenv("LVSA_SPARSITY_SCALE", "inf")
    else:
        argv += ["--sparsity-scale", "nan"]
    assert main("wan", argv) == 2
    assert "sparsity" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("value", ["abc", "inf", "-3"])
def test_a_bad_collective_timeout_variable_is_one_line(value, no_model_load, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LVSA_COLLECTIVE_TIMEOUT", value)
    assert main("wan", ["--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"LVSA_COLLECTIVE_TIMEOUT={value}: must be a positive number of seconds" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("device", "message"), [("bogus", "--device bogus: not a device name"),
                                                 ("mps", "--device mps: lvsa has no device module for mps")])
def test_a_bad_device_is_one_line_before_loading(device, message, no_model_load, tmp_path, capsys):
    assert main("wan", ["--output-dir", str(tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("output", [[], ["--output-latent"]], ids=["mp4", "latent"])
def test_a_non_finite_result_is_an_error_and_nothing_is_written(output, tmp_path, capsys):
    """A checkpoint whose weights hold NaN in the data (safetensors has no checksum) gives NaN frames: exit 2, a
    line that says so, and no file under the output name."""
    torch.manual_seed(0)
    pipe = example_model("wan").tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] = float("nan")
    pipe.save_pretrained(tmp_path / "broken")
    out = tmp_path / "out"
    code = main("wan", ["--model", str(tmp_path / "broken"), "--num-frames", "9", "--steps", "1", "--height", "32",
                        "--width", "32", "--output-dir", str(out), "--output-name", "clip", *output])
    err = capsys.readouterr().err
    assert code == 2 and "holds NaN or infinite values" in err
    assert not list(out.glob("clip*")), list(out.iterdir())


@pytest.mark.parametrize("argv", [["--lvsa", "--flashinfer"], ["--lvsa", "--backend", "npu"]],
                         ids=["flashinfer", "npu"])
def test_a_requested_driver_that_cannot_run_here_fails_before_loading(argv, no_model_load, tmp_path, capsys):
    assert main("wan", ["--output-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "cannot run this run on cpu" in err and "installed drivers on cpu" in err
    assert "LVSA_FALLBACK=warn" in err


def test_make_plan_takes_whole_text_tokens():
    with pytest.raises(GeometryError, match=r"text_tokens=2\.5"):
        lvsa.make_plan(12, 4, text_tokens=2.5, model="wan")
    with pytest.raises(GeometryError, match="step"):
        lvsa.make_plan(12, 4, step=1.5, model="wan")


def test_a_checkpoint_of_another_family_is_named(tmp_path, capsys):
    torch.manual_seed(0)
    example_model("cogvideox").tiny_pipeline().save_pretrained(tmp_path / "cog")
    code = main("wan", ["--model", str(tmp_path / "cog"), "--num-frames", "9", "--steps", "1",
                        "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "CogVideoXTransformer3DModel, not a wan model" in err


# -- flags without effect ------------------------------------------------------------------------------------

def test_lvsa_settings_without_lvsa_are_warned_about(tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="lvsa")
    code = main("wan", ["--num-frames", "9", "--steps", "1", "--sparsity-scale", "0.5", "--flashinfer",
                        "--output-dir", str(tmp_path)])
    assert code == 0
    warned = caplog.text
    assert "--sparsity-scale" in warned and "--flashinfer" in warned and "no effect without --lvsa" in warned


def test_riflex_alone_prints_no_sparse_plan(tmp_path, capsys):
    code = main("wan", ["--num-frames", "161", "--steps", "1", "--riflex", "--output-latent",
                        "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "plan:" not in out and "kfi=" not in out and "attention stays dense" in out


# -- names ---------------------------------------------------------------------------------------------------

def test_output_names_are_kept_and_reports_do_not_collide(tmp_path, capsys):
    base = ["--num-frames", "9", "--steps", "1", "--output-dir", str(tmp_path)]
    assert main("wan", [*base, "--output-name", "clip_1.5x"]) == 0
    assert main("wan", [*base, "--output-name", "clip_1.5x", "--output-latent"]) == 0
    assert main("wan", [*base, "--output-name", "named.mp4"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["clip_1.5x.mp4", "clip_1.5x.mp4.memory.json", "clip_1.5x.pt", "clip_1.5x.pt.memory.json",
                     "named.mp4", "named.mp4.memory.json"]
    assert f"will be written to {tmp_path / 'clip_1.5x.mp4'}" in out
    assert json.loads((tmp_path / "clip_1.5x.mp4.memory.json").read_text())


# -- failed and interrupted writes ---------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [([], "writing the mp4 failed"),
                                              (["--output-latent"], "writing the latent {target} failed:")])
def test_a_failed_write_exits_non_zero_and_leaves_nothing(flags, message, tmp_path):
    """Under a file-size limit ffmpeg writes a truncated file and exits non-zero, and torch.save raises a
    RuntimeError of its own: either way one line, exit status 2, no output and no temporary."""
    out = tmp_path / "videos"
    command = (f"ulimit -f 16; exec {sys.executable} {ROOT / 'examples' / 'wan_generate.py'} --num-frames 161 "
               f"--steps 1 --output-dir {out} --output-name clip {' '.join(flags)}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    target = out / ("clip.pt" if flags else "clip.mp4")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.format(target=target) in last
    assert "Traceback" not in result.stderr and "output:" not in result.stdout
    assert list(out.iterdir()) == []


def test_the_encoder_checks_the_frame_count(tmp_path, monkeypatch):
    import imageio_ffmpeg

    from lvsa.errors import LVSAError
    from lvsa_app.generation import write_mp4

    frames = torch.rand(5, 32, 32, 3).numpy()
    write_mp4(frames, tmp_path / "ok.mp4", 8)
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "ok.mp4"))[0] == 5
    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda path: (3, 0.4))
    with pytest.raises(LVSAError, match="3 of 5 frames"):
        write_mp4(frames, tmp_path / "short.mp4", 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mp4"]


def test_sigterm_removes_the_temporary_file(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from lvsa.files import atomic_write
        from lvsa_app.generation import terminate_on_sigterm

        terminate_on_sigterm()

        def write(path):
            path.write_bytes(b"half a video")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        atomic_write(Path({str(tmp_path / 'clip.mp4')!r}), write)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert list(tmp_path.iterdir()) == []


# -- several devices -----------------------------------------------------------------------------------------

def test_collectives_have_a_configurable_timeout(monkeypatch):
    import torch.distributed as dist

    from lvsa import parallel

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "0")
    parallel.init_distributed("cpu", timeout=42)
    assert seen["timeout"].total_seconds() == 42 and seen["backend"] == "gloo"


def test_a_stopped_rank_fails_the_others_within_the_timeout(tmp_path):
    """Two gloo processes; rank 1 never reaches the collective: rank 0 fails after the timeout, not 30 min."""
    script = textwrap.dedent("""
        import os, sys, time
        import torch, torch.distributed as dist
        from lvsa.parallel import init_distributed
        rank, world, _ = init_distributed("cpu", timeout=3)
        if rank == 1:
            time.sleep(20)
            sys.exit(0)
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
        except Exception as error:
            print(f"failed after {time.monotonic() - start:.0f}s: {type(error).__name__}", flush=True)
            os._exit(3)
        os._exit(0)
    """)
    (tmp_path / "worker.py").write_text(script)
    import socket

    with socket.socket() as probe:  # a free port: a fixed one collides with any other run on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py")], stdout=subprocess.PIPE, text=True,
                                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        out, _ = workers[0].communicate(timeout=15)
    finally:
        for worker in workers:
            worker.kill()
    assert workers[0].returncode == 3 and "failed after" in out


# -- #30: outputs that exist, are being written, or are paths ------------------------------------------------

TINY_RUN = ["--num-frames", "9", "--steps", "1"]


def test_an_existing_output_is_not_replaced_unless_asked(tmp_path, capsys):
    base = [*TINY_RUN, "--output-dir", str(tmp_path)]
    assert main("wan", [*base, "--output-name", "clip"]) == 0
    first = (tmp_path / "clip.mp4").read_bytes()
    capsys.readouterr()
    assert main("wan", [*base, "--output-name", "clip", "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--output-name clip: {tmp_path / 'clip.mp4'} exists; pass --overwrite to replace it, or "
                        "give another name") and len(err.splitlines()) == 1
    assert (tmp_path / "clip.mp4").read_bytes() == first
    assert main("wan", [*base, "--output-name", "clip", "--seed", "7", "--overwrite"]) == 0
    assert (tmp_path / "clip.mp4").read_bytes() != first


def test_a_taken_default_name_becomes_a_fresh_one_and_says_so(tmp_path, capsys):
    base = [*TINY_RUN, "--output-dir", str(tmp_path)]
    assert main("wan", base) == 0 and main("wan", base) == 0
    out = capsys.readouterr().out
    assert "wan_9f_dense.mp4 is taken" in out and f"written to {tmp_path / 'wan_9f_dense-2.mp4'}" in out
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["wan_9f_dense-2.mp4", "wan_9f_dense.mp4"]
    assert not list(tmp_path.glob(".*.lock"))  # the claims were released


def test_two_runs_cannot_claim_one_name(tmp_path, capsys):
    """A run holds its output name (here: this test, as another run would) until it ends: a second run given
    that name stops before any work; one on the default name takes the next."""
    from lvsa.files import claim_output

    held = claim_output(tmp_path / "clip.mp4")
    default = claim_output(tmp_path / "wan_9f_dense.mp4")
    assert claim_output(tmp_path / "clip.mp4") is None  # what a second process sees
    try:
        assert main("wan", [*TINY_RUN, "--output-dir", str(tmp_path), "--output-name", "clip"]) == 2
        assert f"another run is writing {tmp_path / 'clip.mp4'} now" in capsys.readouterr().err
        assert main("wan", [*TINY_RUN, "--output-dir", str(tmp_path)]) == 0
        assert (tmp_path / "wan_9f_dense-2.mp4").is_file() and not (tmp_path / "wan_9f_dense.mp4").exists()
    finally:
        held.release()
        default.release()
    assert claim_output(tmp_path / "clip.mp4") is not None  # released: claimable again


def test_a_claim_ends_with_its_process(tmp_path):
    """kill -9 leaves no claim behind (the system drops the lock), so no stale lock blocks the next run."""
    from lvsa.files import claim_output

    script = (f"from pathlib import Path; from lvsa.files import claim_output; c = claim_output(Path("
              f"{str(tmp_path / 'clip.mp4')!r})); print(c is not None, flush=True); import time; time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "True"
        assert claim_output(tmp_path / "clip.mp4") is None
    finally:
        child.kill()
        child.wait()
    assert claim_output(tmp_path / "clip.mp4") is not None


def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path):
    from lvsa.files import OutputExists, atomic_write

    target = tmp_path / "clip.mp4"

    def write(path):
        path.write_bytes(b"ours")
        target.write_bytes(b"theirs")  # another program, meanwhile

    with pytest.raises(OutputExists, match=r"clip.mp4 appeared while this run was writing it .* this run's "
                       r"result is .*clip-2.mp4"):
        atomic_write(target, write, replace=False)
    assert target.read_bytes() == b"theirs" and (tmp_path / "clip-2.mp4").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-2.mp4", "clip.mp4"]


def test_an_output_name_with_folders_lands_under_the_working_directory(tmp_path, monkeypatch, capsys):
    """The troubleshooting guide's Docker form: --output-name benchmarks/results/out.mp4."""
    monkeypatch.chdir(tmp_path)
    assert main("wan", [*TINY_RUN, "--output-name", "benchmarks/results/out.mp4"]) == 0
    assert (tmp_path / "benchmarks" / "results" / "out.mp4").is_file()
    assert main("wan", [*TINY_RUN, "--output-name", "a/out", "--output-dir", "b"]) == 2
    assert "give the folder in one of them (--output-dir b/a --output-name out)" in capsys.readouterr().err


# -- #30: models, checkpoints and geometry ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_wan(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan-good")
    example_model("wan").tiny_pipeline().save_pretrained(folder)
    return folder


WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt_header(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:20] = b"x" * 12
    (folder / WEIGHTS).write_bytes(bytes(data))


def _null_transformer(folder):
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))


BROKEN = {
    "truncated weights": (_truncate, f"{WEIGHTS} is not a complete safetensors file (incomplete metadata"),
    "empty weights": (lambda f: (f / WEIGHTS).write_bytes(b""), f"{WEIGHTS} is not a complete safetensors file "
                      "(header too small"),
    "corrupt header": (_corrupt_header, f"{WEIGHTS} is not a complete safetensors file (invalid JSON in header"),
    "no transformer folder": (lambda f: __import__("shutil").rmtree(f / "transformer"),
                              "model_index.json lists transformer (WanTransformer3DModel) but there is no folder"),
    "no vae folder": (lambda f: __import__("shutil").rmtree(f / "vae"), "lists vae (AutoencoderKLWan) but there "
                      "is no folder"),
    "index not json": (lambda f: (f / "model_index.json").write_text("{not json"), "model_index.json is not "
                       "valid JSON"),
    "transformer null": (_null_transformer, "model_index.json lists no transformer ([null, null])"),
    "config not json": (lambda f: (f / "transformer" / "config.json").write_text("{bad"), "transformer/config.json "
                        "is not valid JSON"),
    "config missing": (lambda f: (f / "transformer" / "config.json").unlink(), "diffusers could not load "
                       "WanPipeline: Error no file named config.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_checkpoint_is_one_line_naming_the_file(case, saved_wan, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_wan, folder)
    damage, message = BROKEN[case]
    damage(folder)
    assert main("wan", ["--model", str(folder), *TINY_RUN, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --model {folder}: ") and message in err[-1], err[-1]
    assert not [line for line in err if "Traceback" in line]
    assert not list((tmp_path / "out").glob("*.mp4"))


def test_apply_on_a_pipeline_without_its_transformer_is_one_error():
    from diffusers import WanPipeline

    pipe = example_model("wan").tiny_pipeline()
    with pytest.raises(lvsa.ConfigError, match="WanPipeline has no transformer to install lvsa on"):
        lvsa.apply(WanPipeline(**{**pipe.components, "transformer": None}))


def test_a_vae_factor_that_contradicts_the_pipeline_stops_the_example(tmp_path, monkeypatch, capsys):
    """The original finding: LVSA_VAE_TEMPORAL_FACTOR=8 on Wan (4) printed one plan and ran another."""
    monkeypatch.setenv("LVSA_VAE_TEMPORAL_FACTOR", "8")
    assert main("wan", ["--lvsa", *TINY_RUN[2:], "--output-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert ("error: LVSA_VAE_TEMPORAL_FACTOR=8 contradicts WanPipeline.vae_scale_factor_temporal, which is 4"
            in captured.err) and "plan:" not in captured.out


# -- #30: what the run says before and while it works --------------------------------------------------------

def test_the_run_estimates_its_cost_before_the_first_step(tmp_path, capsys):
    assert main("wan", ["--lvsa", "--steps", "1", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 161 frames: 41 latent frames x 16 patches = 656 tokens; 4 x 656^2 x (4 heads x 24) x 2 layers x 2 sequences
    assert ("estimate: 656 video tokens per sequence x 2 sequences per step through 2 layers; self-attention "
            "661.0 MFLOP per step dense, 338.6 MFLOP with lvsa (51%)") in out
    assert out.index("estimate:") < out.index("wall time")


def test_a_run_larger_than_free_memory_is_warned_about(tmp_path, monkeypatch, capsys):
    from lvsa import registry

    monkeypatch.setattr(type(registry.get_device("cpu")), "free_bytes", lambda self, index=None: 1 << 20)
    assert main("wan", [*TINY_RUN, "--output-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: this run needs at least" in err and "but the device has 1.0 MiB free" in err


def test_log_lines_never_share_a_line_with_progress(tmp_path):
    """The guide's grep one-liner on a log file prints log lines only; progress comes as lines of its own."""
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as sink:
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "wan_generate.py"), "--lvsa", "--steps",
                                 "2", "--output-dir", str(tmp_path)], stdout=sink, stderr=subprocess.STDOUT,
                                timeout=300)
    assert result.returncode == 0
    text = log_file.read_text()
    lines = [line for line in text.splitlines() if "[LVSA" in line]
    assert lines and all(line.startswith(("[LVSA", "[lvsa example]")) for line in lines), lines
    assert "\r" not in text and re.search(r"^denoising: 100%.* 2/2 ", text, re.M), text


def test_the_no_effect_warning_names_what_the_user_set(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="lvsa")
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "0.5")
    assert main("wan", [*TINY_RUN, "--window-size", "8", "--output-dir", str(tmp_path)]) == 0
    assert "LVSA_SPARSITY_SCALE=0.5, --window-size 8: no effect without --lvsa" in caplog.text


def test_the_cli_ends_quietly_when_its_reader_stops(tmp_path):
    lvsa_command = Path(sys.executable).parent / "lvsa"  # the installed console script, as users run it
    command = f"{lvsa_command} report | true; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr
