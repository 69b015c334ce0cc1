"""The README's settings table covers every setting, so users can find each variable and flag."""

from __future__ import annotations

from pathlib import Path

from lvsa.settings import LVSASettings, env_var, flag

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_every_setting():
    text = README.read_text()
    missing = [name for name in LVSASettings.model_fields if f"`{env_var(name)}`" not in text
               or f"`{flag(name)}" not in text]
    assert not missing, f"README settings table lacks: {missing}"
