"""Running a vendor tool (``nvidia-smi``, ``npu-smi``) and reading its numbers: shared by the device modules'
parsers. Nothing here raises for a tool's sake: a missing tool or odd output becomes a reading's ``note``."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence

#: runs a command and returns (exit code, stdout + stderr); replaced in tests
Runner = Callable[[Sequence[str]], tuple[int, str]]


class SmiParseError(ValueError):
    pass


def run_command(command: Sequence[str], timeout: float = 15.0) -> tuple[int, str]:
    if shutil.which(command[0]) is None:
        return 127, f"{command[0]}: not found on PATH"
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"{command[0]}: no answer within {timeout:.0f} s"
    except OSError as error:
        return 126, f"{command[0]}: {error}"
    return done.returncode, (done.stdout or "") + (done.stderr or "")


def number(text: str) -> float | None:
    text = text.strip().removesuffix("MiB").strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "-"):
        return None  # [N/A], [Not Supported], -
    return float(text)


def first_line(text: str, fallback: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:200]
    return fallback
