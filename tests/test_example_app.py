"""The example scripts never report a failure as success, and check what they are given before any model is
loaded: failed encodes, interrupted writes, output locations, names, numbers, settings, flags without
effect, collective timeouts."""

from __future__ import annotations

import json
import math
import os
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
    (["--output-name", "../../x"], "--output-name '../../x': give a file name, not a path"),
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

def test_a_failed_encode_exits_non_zero_and_leaves_nothing(tmp_path):
    """ffmpeg under a file-size limit writes a truncated file and exits non-zero: no output, exit status 2."""
    out = tmp_path / "videos"
    command = (f"ulimit -f 16; exec {sys.executable} {ROOT / 'examples' / 'wan_generate.py'} --num-frames 161 "
               f"--steps 1 --output-dir {out} --output-name clip")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "writing the mp4 failed" in result.stderr
    assert "output:" not in result.stdout
    assert list(out.iterdir()) == []  # neither the file nor its temporary


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
