"""Atomic writes: a temporary file in the same folder, then one rename.

A reader sees the old file or the new one, never a truncated one. Outputs are refused when
they exist (unless `force`), and never written over an input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError, UsageError

__all__ = ["atomic_path", "atomic_dir", "check_output", "write_text_atomic"]


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Validate an output path before any work is done.

    Raises:
        OutputExistsError: it exists and `force` is false.
        UsageError: it is one of the inputs, or its folder is missing or not writable.
    """
    out = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise UsageError(f"output {out} is also an input; vcon-fx never overwrites its input: choose another -o path")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} exists: pass --force to replace it, or choose another path")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable: choose another -o path")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it over `path` only on success."""
    final = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.absolute().parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it private; an output is an ordinary file
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only on success.

    An existing folder at `path` is moved aside first and removed after the swap, so a crash
    leaves either the old folder or the new one (plus, at worst, a hidden leftover).
    """
    final = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.absolute().parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an output folder is an ordinary one
    old = None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
