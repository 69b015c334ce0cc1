"""``tox -e cuda`` / ``tox -e npu`` must fail, not skip, on a host without that device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PARITY = Path(__file__).resolve().parent / "test_parity.py"


def test_a_required_device_that_is_absent_fails_the_run(tmp_path):
    env = {**os.environ, "LVSA_TEST_DEVICES": "nosuchdevice"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--import-mode=importlib", "--rootdir", str(PARITY.parents[2]), str(PARITY)],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode != 0
    assert "nosuchdevice: no device module registered" in result.stdout + result.stderr
