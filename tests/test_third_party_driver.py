"""A driver (and a broken one) registered by another installed distribution is picked up through the
``lvsa.backends`` entry point. Checked in a fresh interpreter: stevedore caches entry points per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

DRIVER = '''
from lvsa.backends.sdpa import SdpaDriver
from lvsa.driver import Availability

class EchoDriver(SdpaDriver):
    """A third-party driver: SDPA under another name, counting its runs."""
    name = "echo"
    priority = 1
    runs = 0

    def is_available(self, device_type):
        return Availability.yes("third-party echo driver")

    def run(self, prepared, q, k, v, key_padding_mask=None):
        type(self).runs += 1
        return super().run(prepared, q, k, v, key_padding_mask)
'''

PROBE = '''
import json, torch, lvsa
from lvsa import registry
plan = lvsa.make_plan(9, 4, settings=lvsa.LVSASettings(reference_latent_frames=3, window_size=4))
q, k, v = (torch.randn(1, plan.seq_len, 2, 8) for _ in range(3))
out = lvsa.sparse_attention(q, k, v, plan, backend="echo")
ref = lvsa.sparse_attention(q, k, v, plan, backend="reference")
rows = {r.name: [r.available, r.reason, r.distribution] for r in lvsa.available_drivers("cpu")}
print(json.dumps({"rows": rows, "runs": registry.drivers()["echo"].runs,
                  "err": float((out - ref).abs().max())}))
'''


def _fake_distribution(root):
    (root / "lvsa_echo_driver.py").write_text(textwrap.dedent(DRIVER))
    info = root / "lvsa_echo_driver-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lvsa-echo-driver\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[lvsa.backends]\necho = lvsa_echo_driver:EchoDriver\nbroken = lvsa_missing_module:Nothing\n"
    )
    (info / "RECORD").write_text("")


def test_entry_point_from_another_distribution_is_discovered_and_runs(tmp_path):
    _fake_distribution(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["runs"] == 1 and report["err"] < 1e-5
    assert report["rows"]["echo"][0] is True and report["rows"]["echo"][2] == "lvsa-echo-driver"
    # a broken plugin is listed with its error instead of breaking import lvsa or disappearing
    available, reason, _ = report["rows"]["broken"]
    assert available is False and "lvsa_missing_module" in reason
    assert "[LVSA] plugin 'broken'" in result.stderr
