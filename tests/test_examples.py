"""The examples run end to end on CPU and write what they say they write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_sparse_attention_demo_writes_its_memory_report(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sparse_attention_demo.py"), "--num-frames", "161", "--height", "64",
         "--width", "64", "--repeats", "1", "--output-dir", "out", "--sparsity-scale", "0.5"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "[LVSA] kfi=" in result.stderr  # logged once, when the plan is first prepared
    assert "max abs error vs float64 reference" in result.stdout
    report = tmp_path / "out" / "sparse_attention_demo.memory.json"
    assert f"memory report: {report}" in result.stdout
    assert json.loads(report.read_text())["allocator_peak"]["kind"] == "process_rss"


def test_sparse_attention_demo_rejects_a_bad_setting(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "sparse_attention_demo.py"), "--window-size", "-1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "LVSA_WINDOW_SIZE" in result.stderr
