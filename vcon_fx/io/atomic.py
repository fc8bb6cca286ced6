"""Atomic writes: a temporary file in the same folder, then one rename.

A reader sees the old file or the new one, never a truncated one. Outputs are refused when
they exist (unless `force`), and never written over an input. Data is flushed to disk
(fsync) before the rename, so a crash or power loss cannot leave a renamed but empty file.
Replacing an existing folder is one atomic exchange on Linux (renameat2 RENAME_EXCHANGE);
elsewhere it is two renames, and a failure between them puts the old folder back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError, OutputExistsError, UsageError

__all__ = ["atomic_path", "atomic_dir", "check_output", "write_text_atomic"]

log = logging.getLogger(__name__)


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Validate an output path before any work is done (pure: a probe file is created and removed).

    Args:
        path: the file or folder to be written.
        force: allow replacing an existing output.
        inputs: paths the command reads; the output may not be one of them.

    Returns:
        `path` as a Path.

    Raises:
        OutputExistsError: it exists and `force` is false.
        UsageError: it is one of the inputs, or its folder is missing or not writable.

    Example:
        >>> check_output("model.vcon")
        PosixPath('model.vcon')
    """
    out = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise UsageError(f"output {out} is also an input; vcon-fx never overwrites its input: choose another -o path")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} exists: pass --force to replace it, or choose another path")
    parent = out.absolute().parent
    if not parent.is_dir():
        if parent.exists():
            raise UsageError(f"output folder {parent} is a file, not a folder: choose another -o path")
        raise UsageError(f"output folder {parent} does not exist: create it first, or choose another -o path")
    # os.access says yes to root everywhere, and no read-only mount or /proc stops it: try it.
    if not os.access(parent, os.W_OK) or not _can_create_in(parent):
        raise UsageError(f"output folder {parent} is not writable: choose another -o path")
    return out


def _can_create_in(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(prefix=".vcon-fx-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; move it onto `path` only when the block succeeds.

    Raises:
        OutputError: the temporary file cannot be created or renamed (folder read-only, disk full).

    Example:
        >>> with atomic_path("notes.txt") as tmp:
        ...     tmp.write_text("done")
    """
    final = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.absolute().parent)
    except OSError as e:
        raise _write_error(final, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it private; an output is an ordinary file
        yield tmp_path
        _fsync_file(tmp_path)
        try:
            os.replace(tmp_path, final)
        except OSError as e:
            raise _write_error(final, e) from None
        _fsync_dir(final.absolute().parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; swap it into place only when the block succeeds.

    An existing folder (or file) at `path` is exchanged with the new one in one step where the
    system allows it, then removed. A failure at any point leaves the old output untouched
    and no temporary folder behind; a process killed mid-way leaves the old output (or none,
    if there was none) plus, at worst, a hidden `.NAME.*.tmp` folder.

    Raises:
        OutputError: the temporary folder cannot be created or renamed.

    Example:
        >>> with atomic_dir("model.vcon") as tmp:
        ...     (tmp / "recipe.json").write_text("{}")
    """
    final = Path(path)
    parent = final.absolute().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise _write_error(final, e) from None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an output folder is an ordinary one
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                _fsync_file(item)
        _fsync_dir(tmp)
        try:
            if final.exists() or final.is_symlink():
                _replace_existing(tmp, final)  # afterwards `tmp` holds the old output
            else:
                os.replace(tmp, final)
        except OSError as e:
            raise _write_error(final, e) from None
        _fsync_dir(parent)
    finally:
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink()
        elif tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_existing(new: Path, final: Path) -> None:
    """Put `new` at `final`; the old `final` ends up at `new` (to be deleted by the caller)."""
    if _exchange(new, final):
        return
    # No atomic exchange here: move the old output aside, then the new one in; undo on failure.
    old = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError:
        os.replace(old, final)
        raise
    os.replace(old, new)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a.absolute()), _AT_FDCWD, os.fsencode(b.absolute()), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False  # old kernel or a filesystem without exchange: the fallback handles it
    raise OSError(err, os.strerror(err), str(b))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (in place on the file system, pure otherwise).

    Raises:
        OutputError: the folder is not writable or the disk is full.

    Example:
        >>> write_text_atomic("log.jsonl", "")
    """
    with atomic_path(path) as tmp:
        try:
            tmp.write_text(text)
        except OSError as e:
            raise _write_error(Path(path), e) from None


def _write_error(final: Path, e: OSError) -> OutputError:
    reason = e.strerror or type(e).__name__
    return OutputError(f"cannot write {final} ({reason}): choose another -o path, or free space / fix permissions "
                       f"in {final.absolute().parent}")


def _fsync_file(path: Path) -> None:
    # Durability, not atomicity: without it a crash soon after the rename can leave an empty file.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("fsync(%s) failed; the data stays in the page cache", path)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
