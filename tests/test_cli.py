"""The lvsa command: plan and backends, help, and errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lvsa.cli import main


def test_plan_for_wan_at_321_frames(capsys):
    assert main(["plan", "--model", "wan", "--num-frames", "321"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[LVSA] reference_latent_frames=21 target_latent_frames=81 extension_ratio=3.86x"
    assert out[1] == "[LVSA] kfi=6 global_count=14 attended_per_frame=21/81"
    assert "tokens_per_frame=1560 seq_len=126360 density=0.259" in out[2]
    picture = [line for line in out if line.split()[-1].isdigit() and len(line.split()) == 3]
    assert len(picture) == 81


def test_plan_flags_and_environment(capsys, monkeypatch):
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "0.5")
    assert main(["plan", "--model", "hunyuan", "--num-frames", "129", "--no-mask"]) == 0
    assert "attended_per_frame=16/33" in capsys.readouterr().out
    # the flag beats the environment
    assert main(["plan", "--model", "hunyuan", "--num-frames", "129", "--no-mask", "--sparsity-scale", "1"]) == 0
    assert "attended_per_frame=33/33" in capsys.readouterr().out


def test_plan_with_explicit_latent_sizes_as_json(capsys):
    args = ["plan", "--latent-frames", "30", "--patches-per-frame", "7", "--reference-latent-frames", "10",
            "--step", "2", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["latent_frames"] == 30 and data["patches_per_frame"] == 7 and data["step"] == 2
    assert len(data["indptr"]) == 31


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--model", "wan"], "--num-frames"),
        (["plan", "--num-frames", "81"], "LVSA_VAE_TEMPORAL_FACTOR"),
        (["plan", "--model", "wan", "--num-frames", "81", "--height", "481"], "height=481"),
        (["plan", "--model", "wan", "--num-frames", "81", "--window-size", "-4"], "LVSA_WINDOW_SIZE"),
    ],
)
def test_plan_errors_exit_2_with_a_message(capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "wan", "--num-frames", "81", "--sparsity", "0.5"])
    assert exit_info.value.code == 2


def test_help_lists_settings_with_their_variables(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for needle in ("--sparsity-scale", "LVSA_SPARSITY_SCALE", "--no-rotate-keyframes"):
        assert needle in text
    # one flag per setting: the example application's --lvsa and --flashinfer are not the library's
    assert "--flashinfer" not in text and "--lvsa" not in text


@pytest.mark.parametrize("command", ["drivers", "backends"])  # backends: the earlier name, kept working
def test_drivers_table(capsys, command):
    assert main([command, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sdpa" in out and "usable" in out and "reference" in out


def test_console_script_is_installed():
    exe = shutil.which("lvsa")
    assert exe, "the lvsa console script is not on PATH: install the package (pip install -e .)"
    result = subprocess.run([exe, "drivers", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert any(row["name"] == "sdpa" for row in json.loads(result.stdout))


def test_report_text_names_versions_devices_and_sources(capsys, monkeypatch):
    monkeypatch.setenv("LVSA_WINDOW_SIZE", "16")
    assert main(["report", "--sparsity-scale", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lvsa 0.1.0")
    assert "torch " in out and "torch-npu" in out and "flashinfer-python" in out and "diffusers" in out
    assert "sdpa" in out and "cpu    present" in out
    assert "sparsity_scale           0.5        cli" in out
    assert "window_size              16         env" in out


def test_report_json(capsys):
    assert main(["report", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["backend"] == {"value": "auto", "source": "default", "env": "LVSA_BACKEND",
                                           "flag": "--backend"}
    cpu = next(d for d in data["devices"] if d["name"] == "cpu")
    assert cpu["available"] and cpu["allocator"]["kind"] == "process_rss"
    assert {"name", "device", "available", "reason"} <= set(data["drivers"][0])


def test_report_reads_a_version_without_package_metadata(tmp_path, monkeypatch):
    from lvsa import report

    (tmp_path / "flashinfer").mkdir()
    (tmp_path / "flashinfer" / "__init__.py").write_text("__version__ = '9.9.9'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert report.package_version("flashinfer-python") == "9.9.9 (no package metadata)"
    assert report.package_version("lvsa-no-such-package") is None
