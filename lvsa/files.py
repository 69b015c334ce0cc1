"""Writing output files: never a half-written file under the final name, never a file replaced unasked, and
never two runs writing one name."""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LVSAError


class OutputExists(LVSAError, FileExistsError):
    """The output's name was taken by something else while the run was writing it (the result is kept)."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], *, replace: bool = True) -> Path:
    """Call ``write(temporary_path)`` for a temporary file beside ``path``, then move it into place.

    With ``replace=False`` an existing file is never replaced: the move is a hard link, which fails when the
    name exists (on a file system without hard links, an existence check then a rename); the complete result
    then stays under a fresh name, given in the :class:`OutputExists` error. Returns the absolute path. The file
    is made readable by everyone: outputs written as root inside a container must stay readable for the host
    user."""
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)
        if replace:
            os.replace(temporary, target)
        else:
            _publish_new(Path(temporary), target)
    except OutputExists:
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _publish_new(temporary: Path, target: Path) -> None:
    try:
        os.link(temporary, target)
        temporary.unlink()
        return
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some network and FUSE file systems)
        if not target.exists():
            os.replace(temporary, target)
            return
    kept = fresh_path(target)
    os.replace(temporary, kept)
    raise OutputExists(f"{target} appeared while this run was writing it (another program?); it was left as it "
                       f"is and this run's result is {kept}")


def numbered_path(target: Path, number: int) -> Path:
    """The ``number``-th name for an output: ``target`` itself for 1, else ``<stem>-<number><suffix>``."""
    return target if number == 1 else target.with_name(f"{target.stem}-{number}{target.suffix}")


def fresh_path(target: Path) -> Path:
    """The first of :func:`numbered_path`'s names that is not taken."""
    return next(path for path in map(functools.partial(numbered_path, target), itertools.count(1))
                if not path.exists())


class OutputClaim:
    """This process's claim on an output name for the length of a run, so that two runs given one name cannot
    both write it: an advisory lock on a hidden ``.<name>.lock`` beside it, which the system releases when the
    process ends, however it ends (no stale claim after a crash or ``kill -9``)."""

    def __init__(self, target: Path, handle: Any, lock_path: Path) -> None:
        self.target = target
        self._handle = handle
        self._lock_path = lock_path

    def release(self) -> None:
        if self._handle is None:
            return
        self._lock_path.unlink(missing_ok=True)
        self._handle.close()
        self._handle = None


def claim_output(target: Path) -> OutputClaim | None:
    """Claim ``target`` for this process; ``None`` when another running process holds it."""
    lock_path = target.with_name(f".{target.name}.lock")
    try:
        import fcntl
    except ImportError:  # not POSIX: the name's lock file itself is the claim
        try:
            handle = open(lock_path, "x")  # held until release()
        except FileExistsError:
            return None
        return OutputClaim(target, handle, lock_path)
    while True:
        handle = open(lock_path, "a")  # held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        try:  # the holder may have released and unlinked it between our open and our lock: lock the file
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino  # that has the name now
        except FileNotFoundError:
            same = False
        if same:
            return OutputClaim(target, handle, lock_path)
        handle.close()
