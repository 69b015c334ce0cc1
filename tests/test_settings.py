"""Settings: precedence CLI > environment > code > model default, and errors that name the variable."""

from __future__ import annotations

import logging
import re

import pytest

import lvsa
from lvsa.errors import ConfigError
from lvsa.settings import LVSASettings


def test_defaults():
    s = lvsa.get_settings()
    assert (s.backend, s.sparsity_scale, s.window_size, s.n_first_frames, s.key_frame_interval) == (
        "auto", 1.0, 12, 4, 16)
    assert s.auto_keyframes is True and s.rotate_keyframes is None and s.fallback == "error"
    assert s.source_of("sparsity_scale") == "default"


def test_environment_beats_code_and_cli_beats_environment(monkeypatch):
    lvsa.configure(sparsity_scale=0.9, window_size=16)
    assert lvsa.get_settings().sparsity_scale == 0.9
    assert lvsa.get_settings().source_of("sparsity_scale") == "code"
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "0.5")
    s = lvsa.get_settings()
    assert s.sparsity_scale == 0.5 and s.source_of("sparsity_scale") == "env"
    assert s.window_size == 16 and s.source_of("window_size") == "code"
    cli = LVSASettings.from_cli(["--sparsity-scale", "0.25"])
    assert cli.sparsity_scale == 0.25 and cli.source_of("sparsity_scale") == "cli"
    assert cli.window_size == 16  # code still applies where the CLI is silent


def test_model_default_is_the_lowest_layer(monkeypatch):
    s = lvsa.get_settings().with_model_defaults(reference_latent_frames=33)
    assert s.reference_latent_frames == 33 and s.source_of("reference_latent_frames") == "model"
    lvsa.configure(reference_latent_frames=21)
    s = lvsa.get_settings().with_model_defaults(reference_latent_frames=33)
    assert s.reference_latent_frames == 21 and s.source_of("reference_latent_frames") == "code"


def test_configure_with_a_cli_settings_object_keeps_cli_above_env(monkeypatch):
    parsed = LVSASettings.from_cli(["--window-size", "20"])
    lvsa.configure(parsed)
    monkeypatch.setenv("LVSA_WINDOW_SIZE", "8")
    assert lvsa.get_settings().window_size == 20


def test_boolean_flags_have_negative_forms():
    s = LVSASettings.from_cli(["--no-auto-keyframes", "--rotate-keyframes"])
    assert s.auto_keyframes is False and s.rotate_keyframes is True
    assert LVSASettings.from_cli(["--no-rotate-keyframes"]).rotate_keyframes is False


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_boolean_environment_values(monkeypatch, value):
    monkeypatch.setenv("LVSA_AUTO_KEYFRAMES", "0")
    monkeypatch.setenv("LVSA_ROTATE_KEYFRAMES", value)
    s = lvsa.get_settings()
    assert s.auto_keyframes is False and s.rotate_keyframes is True


def test_bad_environment_value_names_the_variable_and_the_flag(monkeypatch):
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "-1")
    with pytest.raises(ConfigError) as error:
        lvsa.get_settings()
    message = str(error.value)
    assert "LVSA_SPARSITY_SCALE=-1 (environment)" in message and "--sparsity-scale" in message


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match=r"--window-size 'wide' \(command line\)"):
        LVSASettings.from_cli(["--window-size", "wide"])


def test_bad_code_value_and_unknown_name():
    with pytest.raises(ConfigError, match="LVSA_N_FIRST_FRAMES"):
        lvsa.configure(n_first_frames=-1)
    with pytest.raises(ConfigError, match="did you mean sparsity_scale"):
        lvsa.configure(sparsty_scale=0.5)
    assert lvsa.get_settings().n_first_frames == 4  # a rejected configure changes nothing


def test_unknown_flag():
    with pytest.raises(ConfigError, match="--sparsity"):
        LVSASettings.from_cli(["--sparsity", "0.5"])


def test_bad_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("LVSA_FALLBACK", "sometimes")
    with pytest.raises(ConfigError, match="LVSA_FALLBACK"):
        lvsa.get_settings()


def test_deprecated_schedule_variables_are_accepted_with_a_warning(monkeypatch, caplog):
    lvsa.caches.clear("settings-warnings")
    caplog.set_level(logging.WARNING, logger="lvsa")
    monkeypatch.setenv("LVSA_SCHEDULE_START", "0.2")
    s = lvsa.get_settings()
    assert any(re.match(r"\[LVSA\] LVSA_SCHEDULE_START.*LVSA_SPARSITY_SCALE", m) for m in caplog.messages)
    assert s.schedule_start == 0.2
    plain = lvsa.make_plan(81, 4, model="wan", settings=LVSASettings(schedule_start=None))
    assert lvsa.make_plan(81, 4, model="wan", settings=s) == plain  # no effect on the plan


def test_unknown_lvsa_variable_is_one_lvsa_line_with_a_guess(monkeypatch, caplog, recwarn):
    """An [LVSA] log line (grep finds it), not a Python warning with a source line; once per variable."""
    lvsa.caches.clear("settings-warnings")
    caplog.set_level(logging.WARNING, logger="lvsa")
    monkeypatch.setenv("LVSA_BAKEND", "sdpa")
    lvsa.get_settings()
    LVSASettings()
    lines = [r.getMessage() for r in caplog.records if "LVSA_BAKEND" in r.getMessage()]
    assert lines == ["[LVSA] unknown environment variable LVSA_BAKEND is ignored; did you mean LVSA_BACKEND?"]
    assert not [w for w in recwarn if "LVSA" in str(w.message)]


def test_the_original_wan_hook_variable_is_said_to_be_not_needed(monkeypatch, caplog):
    lvsa.caches.clear("settings-warnings")
    caplog.set_level(logging.WARNING, logger="lvsa")
    monkeypatch.setenv("LVSA_WAN_HOOK", "1")
    lvsa.get_settings()
    assert "[LVSA] LVSA_WAN_HOOK=1 is not needed" in caplog.text and "no effect" in caplog.text


def test_flashinfer_alias():
    """--flashinfer is the example application's (the original tool's spelling); the library has one flag."""
    from lvsa_app.settings import AppSettings

    assert AppSettings.from_cli(["--flashinfer"]).backend == "flashinfer"
    with pytest.raises(ConfigError, match="flashinfer"):
        AppSettings.from_cli(["--flashinfer", "--backend", "sdpa"])
    with pytest.raises(ConfigError, match="unknown flag"):
        LVSASettings.from_cli(["--flashinfer"])


def test_application_settings_keep_their_flags_and_variables(monkeypatch):
    from lvsa_app.settings import AppSettings

    assert AppSettings.from_cli(["--lvsa"]).enabled is True
    monkeypatch.setenv("LVSA_ENABLED", "1")
    assert AppSettings().enabled is True and AppSettings().source_of("enabled") == "env"
    monkeypatch.setenv("LVSA_ENABLED", "maybe")
    with pytest.raises(ConfigError, match=r"LVSA_ENABLED=maybe \(environment\).*flag --lvsa, env LVSA_ENABLED"):
        AppSettings()
    assert "enabled" not in LVSASettings.model_fields and "flashinfer" not in LVSASettings.model_fields


def test_backend_names_are_normalised(monkeypatch):
    monkeypatch.setenv("LVSA_BACKEND", " SDPA ")
    assert lvsa.get_settings().backend == "sdpa"


@pytest.mark.parametrize(("where", "value", "message"), [
    ("env", "bogus", "'bogus' is no installed driver: use auto or one of"),
    ("code", "flashinfr", "'flashinfr' is no installed driver (did you mean flashinfer?)"),
    ("cli", "nosuch", "'nosuch' is no installed driver"),
])
def test_an_unknown_driver_name_is_a_settings_error(where, value, message, monkeypatch):
    """Checked when the settings are made (configure, a flag, a variable), not at the first attention call."""
    with pytest.raises(ConfigError, match="LVSA_BACKEND") as error:
        if where == "env":
            monkeypatch.setenv("LVSA_BACKEND", value)
            lvsa.get_settings()
        elif where == "code":
            lvsa.configure(backend=value)
        else:
            LVSASettings.from_cli(["--backend", value])
    assert message in str(error.value)
    assert where == "env" or lvsa.get_settings().backend == "auto"  # nothing was stored


def test_get_settings_is_cached_until_something_changes(monkeypatch):
    a, b = lvsa.get_settings(), lvsa.get_settings()
    assert a is b
    monkeypatch.setenv("LVSA_WINDOW_SIZE", "8")
    assert lvsa.get_settings().window_size == 8
