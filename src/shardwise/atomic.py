"""Atomic outputs: a file or folder appears complete at its final path, or not at all.

Writers write into a hidden staging path next to the destination (same filesystem, so the final
rename is atomic), fsync what they wrote, and :func:`atomic_output` renames it into place. On any
error, KeyboardInterrupt included, the staging path is removed and the destination is untouched.
A process killed with SIGKILL can leave a ``.NAME.shardwise-tmp-*`` entry behind, never a
half-written ``NAME``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import OutputExistsError

__all__ = ["atomic_output", "durable_close", "fsync_dir", "staging_name"]

_RENAME_EXCHANGE = 2  # linux/fs.h


def staging_name(dst: Path) -> Path:
    """A hidden sibling of ``dst`` used while writing it."""
    return dst.parent / f".{dst.name}.shardwise-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def durable_close(f: BinaryIO) -> None:
    """Flush, fsync and close a file written in a staging area."""
    f.flush()
    os.fsync(f.fileno())
    f.close()


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def check_output_free(dst: Path, overwrite: bool) -> None:
    """Raise OutputExistsError when ``dst`` exists and ``overwrite`` is false."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{dst}: output already exists; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, is_dir: bool, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging path to write ``dst`` into; commit it on success, delete it on failure.

    For ``is_dir=True`` the staging folder exists when yielded; for a file, only its parent does.
    Files written inside must be closed with :func:`durable_close` (or otherwise fsynced). An
    existing ``dst`` raises :class:`OutputExistsError` before anything is written unless
    ``overwrite`` is true; it is then replaced atomically (a file by rename, a folder by an atomic
    exchange where Linux offers one, else by two renames) and removed only after the new output is
    in place.
    """
    dst = Path(dst)
    check_output_free(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_name(dst)
    if is_dir:
        stage.mkdir()
    try:
        yield stage
        if is_dir:
            fsync_dir(stage)
        _commit(stage, dst, overwrite)
    except BaseException:
        _remove(stage)
        raise
    fsync_dir(dst.parent)


def _commit(stage: Path, dst: Path, overwrite: bool) -> None:
    exists = dst.exists() or dst.is_symlink()
    if exists and not overwrite:  # appeared while we were writing
        raise OutputExistsError(f"{dst}: output appeared while it was being written; nothing was replaced")
    if not exists or (stage.is_file() and dst.is_file()):
        os.replace(stage, dst)
        return
    if _exchange(stage, dst):
        _remove(stage)  # now holds the old output
        return
    old = staging_name(dst)
    os.rename(dst, old)
    os.rename(stage, dst)
    _remove(old)
