"""The dense warm-up and the dense layers (lvsa.dense): settings, flags and variables, ``lvsa plan``, and the
host that refuses them. Through the real pipelines: tests/test_pipelines.py (every dense call equal to dense
attention over the same tensors, the others to the float64 reference of their plan, counts per step, Wan
2.2's two transformers) and tests/test_compile.py (no recompiles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lvsa import LVSASettings
from lvsa.dense import DenseControls, format_layer_ranges, parse_layer_ranges
from lvsa.errors import ConfigError


# -- settings --------------------------------------------------------------------------------------
def test_layer_ranges_parse_and_print_canonically():
    assert parse_layer_ranges(" 28-29, 0,1,1 ") == (0, 1, 28, 29)
    assert format_layer_ranges((0, 1, 28, 29, 5)) == "0-1,5,28-29"
    assert LVSASettings(dense_layers="3,0-1").dense_layers == "0-1,3"


@pytest.mark.parametrize("given, says", [("a", "not a layer index"), ("3-1", "a range goes up"), ("-2", "start at 0"),
                                         (",", "no layer given"), ("1-b", "not a layer index")])
def test_bad_layer_ranges_are_one_line_errors_naming_the_variable(monkeypatch, given, says):
    monkeypatch.setenv("LVSA_DENSE_LAYERS", given)
    with pytest.raises(ConfigError, match=says) as error:
        LVSASettings()
    assert f"LVSA_DENSE_LAYERS={given}" in str(error.value)


@pytest.mark.parametrize("values, says", [({"dense_warmup_fraction": 1.5}, "less than or equal to 1"),
                                          ({"dense_warmup_fraction": -0.1}, "greater than or equal to 0"),
                                          ({"dense_warmup_steps": -1}, "greater than or equal to 0"),
                                          ({"dense_warmup_steps": 2, "dense_warmup_fraction": 0.2}, "give one")])
def test_bad_warmups_are_refused(values, says):
    with pytest.raises(ConfigError, match=says):
        LVSASettings(**values)


def test_flags_and_variables_reach_the_settings(monkeypatch):
    monkeypatch.setenv("LVSA_DENSE_WARMUP_FRACTION", "0.2")
    settings = LVSASettings.from_cli(["--dense-layers", "0-1,28-29"])
    controls = DenseControls.from_settings(settings)
    assert controls.layers == (0, 1, 28, 29) and controls.warmup_fraction == 0.2
    assert controls.warmup_steps(50) == 10 and controls.warmup_steps(4) == 1 and controls.warmup_steps(1) == 0
    assert "LVSA_DENSE_WARMUP_FRACTION=0.2" in controls.warmup_line(50)
    with pytest.raises(ConfigError, match="does not know how many"):
        controls.warmup_steps(None)


def test_the_schedule_variables_keep_their_documented_meaning(monkeypatch, caplog):
    """The guides say LVSA_SCHEDULE_START/END do nothing: they still do nothing, and the warning names both
    the sparsity scale and the dense warm-up."""
    monkeypatch.setenv("LVSA_SCHEDULE_START", "0.2")
    settings = LVSASettings()
    assert DenseControls.from_settings(settings) == DenseControls()
    assert "LVSA_DENSE_WARMUP_FRACTION" in caplog.text and "LVSA_SPARSITY_SCALE" in caplog.text


# -- lvsa plan ---------------------------------------------------------------------------------------
def _lvsa(*args, cwd):
    return subprocess.run([str(Path(sys.executable).parent / "lvsa"), *args], capture_output=True, text=True, cwd=cwd)


def test_lvsa_plan_says_which_steps_and_layers_run_dense(tmp_path):
    done = _lvsa("plan", "--model", "wan", "--num-frames", "161", "--dense-warmup-fraction", "0.2", "--steps", "50",
                 "--dense-layers", "0-1,28-29", "--step", "12", "--no-mask", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[LVSA] dense warm-up: steps 0-9 of 50 run dense, 10-49 sparse (--dense-warmup-fraction 0.2)" in done.stdout
    assert "[LVSA] dense layers: 4 self-attention layers (0-1,28-29) run dense in every step" in done.stdout
    assert "[LVSA] kfi=3 " in done.stdout
    warm = _lvsa("plan", "--model", "wan", "--num-frames", "161", "--dense-warmup-steps", "3", "--step", "2",
                 "--no-mask", cwd=tmp_path)
    assert "step 2 is a dense warm-up step" in warm.stdout and "kfi=1 " in warm.stdout
    missing = _lvsa("plan", "--model", "wan", "--num-frames", "161", "--dense-warmup-fraction", "0.2", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("give --steps N, the run's number of steps")


def test_lvsa_plan_draws_the_mask(tmp_path):
    from PIL import Image

    done = _lvsa("plan", "--model", "wan", "--num-frames", "161", "--step", "3", "--png", "mask.png", "--no-mask",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "mask.png") as image:
        assert image.format == "PNG" and image.size == (640, 720)
        # the picture holds the three cell colours of a sparse plan (skipped, window, global)
        colours = {colour for _, colour in image.convert("RGB").getcolors(1 << 20)}
    assert {(0xf2, 0xf2, 0xf2), (0x4c, 0x8b, 0xd6), (0xf2, 0x9e, 0x38)} <= colours
    wrong = _lvsa("plan", "--model", "wan", "--num-frames", "161", "--png", "mask.jpg", cwd=tmp_path)
    assert wrong.returncode == 2 and "name the file *.png" in wrong.stderr
