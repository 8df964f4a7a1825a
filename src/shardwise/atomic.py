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
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import OutputExistsError

__all__ = [
    "atomic_output", "durable_close", "fsync_dir", "fsync_file", "staging_name", "remove_stale_stages", "write_all",
    "write_text_durably", "start_writeback", "commit_stage", "discard_stage", "process_temporary_file", "process_temporary_folder",
    "temporary_folder",
]

_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2


_STAGE = re.compile(r"\.(?P<name>.+)\.shardwise-tmp-(?P<pid>\d+)-[0-9a-f]{8}")


def staging_name(dst: Path) -> Path:
    """A hidden sibling of ``dst`` used while writing it (named for the writing process)."""
    return dst.parent / f".{dst.name}.shardwise-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_stages(folder: Path, pattern: re.Pattern = _STAGE, *, folders_only: bool = False) -> None:
    """Remove the staging entries in ``folder`` whose writing process no longer exists (killed mid-write).

    ``pattern`` matches their names and captures the process id as ``pid``; with ``folders_only``,
    entries other than real folders (files, links) are left alone.
    """
    for child in folder.iterdir():
        m = pattern.fullmatch(child.name)
        if m and (not folders_only or (child.is_dir() and not child.is_symlink())) and not process_exists(int(m["pid"])):
            _remove(child)


def process_temporary_file(prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in the system's temporary folder, named ``<prefix><pid>-<random><suffix>``
    for this process; entries of the same name pattern whose process is gone (killed before it
    could remove them) are removed first. The caller removes the file it gets."""
    return tempfile.mkstemp(prefix=_sweep_temporaries(prefix, suffix), suffix=suffix)


def process_temporary_folder(prefix: str) -> str:
    """``tempfile.mkdtemp`` named and swept as :func:`process_temporary_file` names and sweeps files."""
    return tempfile.mkdtemp(prefix=_sweep_temporaries(prefix, ""))


@contextlib.contextmanager
def temporary_folder(prefix: str) -> Iterator[Path]:
    """``tempfile.TemporaryDirectory`` named and swept as :func:`process_temporary_folder`: removed when
    the block ends (also on an exception or the CLI's SIGTERM), and by a later call with the same
    ``prefix`` when this process was killed before it could remove it."""
    path = Path(process_temporary_folder(prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sweep_temporaries(prefix: str, suffix: str) -> str:
    """Remove stale ``<prefix><pid>-<random><suffix>`` entries of the temporary folder; returns this
    process's name prefix."""
    pattern = re.compile(re.escape(prefix) + r"(?P<pid>\d+)-[a-z0-9_]+" + re.escape(suffix))
    remove_stale_stages(Path(tempfile.gettempdir()), pattern)
    return f"{prefix}{os.getpid()}-"


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def write_all(f: BinaryIO, data) -> None:
    """Write every byte of ``data``: unbuffered files may write less than asked (Linux caps one
    write at about 2 GiB), so loop until done."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        if n is None:  # BufferedWriter writes everything or raises
            return
        view = view[n:]


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _libc_function(name: str, argtypes: tuple | None = None):
    """A libc function through ctypes, or None where libc or the function is missing."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)  # the C library this process already has
    except (OSError, AttributeError):
        return None
    if argtypes is not None:
        fn.argtypes = argtypes
    return fn


_SYNC_RANGE = _libc_function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so a later fsync has less left to do.

    Durability still comes from fsync; this only moves the writeback earlier. A no-op where the
    call does not exist or fails.
    """
    if _SYNC_RANGE is not None:
        _SYNC_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def durable_close(f: BinaryIO) -> None:
    """Flush, fsync and close a file written in a staging area."""
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()


def write_text_durably(path: Path, text: str | bytes) -> None:
    """Write ``text`` (UTF-8, or bytes as they are) to ``path`` and fsync it: small files in a staging
    folder must be durable before the commit."""
    with open(path, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    """fsync a file already written and closed (by path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree, quietly leaving what is gone or not ours to remove
    (another user's entry in a shared sticky folder such as /tmp)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            path.unlink()


def _renameat2(a: Path, b: Path, flags: int) -> bool | None:
    """renameat2(2): True when done, False when refused (errno set), None where the system lacks it."""
    renameat2 = _libc_function("renameat2")
    if renameat2 is None:
        return None
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    return None if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL) else False


def check_output_free(dst: Path, overwrite: bool, *, is_dir: bool, any_kind: bool = False) -> None:
    """Raise OutputExistsError when ``dst`` exists and may not be replaced by an output of this kind.

    Even with ``overwrite`` a folder is never replaced by a file or a file by a folder: that is
    almost always a wrong path, and deleting a folder to put a file there would lose its contents.
    ``any_kind`` lifts that rule for callers that have checked what ``dst`` is (a Lightning
    checkpoint path that held a single-file checkpoint and now gets a folder).
    """
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"{dst}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if dst.is_dir() != is_dir and not any_kind:
        have, want = ("a folder", "file") if dst.is_dir() else ("a file", "folder")
        raise OutputExistsError(f"{dst}: exists and is {have}; --overwrite only replaces it with a {want} of the same kind")


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, is_dir: bool, overwrite: bool = False, any_kind: bool = False) -> Iterator[Path]:
    """Yield a staging path to write ``dst`` into; commit it on success, delete it on failure.

    For ``is_dir=True`` the staging folder exists when yielded; for a file, only its parent does.
    Files written inside must be closed with :func:`durable_close` (or otherwise fsynced). An
    existing ``dst`` raises :class:`OutputExistsError` before anything is written unless
    ``overwrite`` is true; it is then replaced atomically (a file by rename, a folder by an atomic
    exchange where Linux offers one, else by two renames) and removed only after the new output is
    in place. ``any_kind``: see :func:`check_output_free`.
    """
    dst = Path(dst)
    check_output_free(dst, overwrite, is_dir=is_dir, any_kind=any_kind)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_name(dst)
    if is_dir:
        stage.mkdir()
    try:
        yield stage
        commit_stage(stage, dst, overwrite, any_kind=any_kind)
    except OSError as e:
        discard_stage(stage)
        raise naming_output(e, dst) from None
    except BaseException:
        discard_stage(stage)
        raise


_OUTPUT_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # errors of writing, whichever file they come from


def naming_output(error: OSError, dst: Path) -> OSError:
    """``error`` naming output ``dst`` when it is a full disk, quota or file-size limit met while
    writing it, which ``write`` reports without a file name; any other error as it is.

    >>> str(naming_output(OSError(errno.ENOSPC, "No space left on device"), Path("out.safetensors")))
    "[Errno 28] No space left on device (while writing it; nothing was left behind): 'out.safetensors'"
    """
    if error.filename is not None or error.errno not in _OUTPUT_FULL:
        return error
    return type(error)(error.errno, f"{error.strerror} (while writing it; nothing was left behind)", str(dst))


def commit_stage(stage: Path, dst: Path, overwrite: bool, *, any_kind: bool = False) -> None:
    """Move a fully written staging path (from :func:`staging_name`) to ``dst``, durably.

    A staged folder is fsynced first (its files must be already); ``dst`` is replaced atomically
    when ``overwrite`` (see :func:`atomic_output`; ``any_kind``: :func:`check_output_free`), else
    OutputExistsError if it appeared meanwhile.
    """
    if stage.is_dir():
        fsync_dir(stage)
    _commit(stage, dst, overwrite, any_kind)
    fsync_dir(dst.parent)


def discard_stage(stage: Path) -> None:
    """Remove a staging path after a failed write (no error if it is already gone)."""
    _remove(stage)


def _commit(stage: Path, dst: Path, overwrite: bool, any_kind: bool = False) -> None:
    appeared = OutputExistsError(f"{dst}: output appeared while it was being written; nothing was replaced")
    if not overwrite:
        done = _renameat2(stage, dst, _RENAME_NOREPLACE)  # atomic "rename unless it exists"
        if done is False:
            raise appeared
        if done is None:
            if dst.exists() or dst.is_symlink():
                raise appeared
            os.rename(stage, dst)
        return
    check_output_free(dst, overwrite, is_dir=stage.is_dir(), any_kind=any_kind)
    if not (dst.exists() or dst.is_symlink()) or (stage.is_file() and dst.is_file()):
        os.replace(stage, dst)
        return
    if _renameat2(stage, dst, _RENAME_EXCHANGE):
        _remove(stage)  # now holds the old output
        return
    old = staging_name(dst)
    os.rename(dst, old)
    try:
        os.rename(stage, dst)
    except BaseException:
        os.rename(old, dst)  # put the old output back before reporting the failure
        raise
    _remove(old)
