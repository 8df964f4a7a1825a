"""Writing and checking the files of a training checkpoint: durable, checksummed on the way out.

:func:`save_object` writes with ``torch.save`` (the payload NxD reads) through a sink that
computes the CRC-32 as bytes go by, then fsyncs; atomicity comes from the tag's staging folder.
:func:`check_file` recomputes size and CRC-32 against the manifest; :func:`torch_load` reads a
file back without running arbitrary pickle.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from ..atomic import start_writeback, write_all, write_text_durably
from ..checksum import crc32, fd_crc32
from ..errors import FormatError, IntegrityError, UnsafeCheckpointError
from ..formats.region import Region, open_region

__all__ = ["save_object", "write_durably", "write_failure", "check_file", "check_against", "file_crc32", "torch_load"]


class _ChecksummingFile(io.RawIOBase):
    """A write-only file that keeps the CRC-32 and size of what goes through (torch.save only appends)."""

    def __init__(self, f) -> None:
        super().__init__()
        self._f = f
        self._fd = f.fileno()
        self.crc = 0
        self.size = 0
        self.error: OSError | None = None  # torch's writer reports a failed write as a RuntimeError about positions

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = crc32(view, self.crc)
        self.size += len(view)
        try:
            write_all(self._f, view)
        except OSError as e:
            self.error = e
            raise
        start_writeback(self._fd, self.size - len(view), len(view))  # the closing fsync then has little left to wait for
        return len(view)

    def flush(self) -> None:
        self._f.flush()


def write_failure(path: Path, error: OSError) -> OSError:
    """The one-line error of a failed checkpoint write: the file, the cause, and that older checkpoints are safe."""
    return OSError(error.errno, f"{path}: writing the checkpoint failed: {error.strerror or error}; earlier checkpoints are untouched")


def save_object(obj: Any, path: Path) -> tuple[int, int]:
    """``torch.save(obj)`` to ``path``, fsynced; returns (size, CRC-32) of the file.

    ``path`` is inside a tag's staging folder, which makes the whole tag atomic; a failed write
    raises OSError naming the file.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb", buffering=0) as raw:
            sink = _ChecksummingFile(raw)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None  # torch reports a failed write as a RuntimeError about positions
            os.fsync(raw.fileno())
    except OSError as e:
        raise write_failure(path, e) from None
    return sink.size, sink.crc


def write_durably(path: Path, data: bytes) -> tuple[int, int]:
    """Write ``data`` to ``path`` (parents created) and fsync it; returns (size, CRC-32).

    For small files inside a staging folder, which makes them atomic; a failed write raises
    OSError naming the file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_durably(path, data)
    except OSError as e:
        raise write_failure(path, e) from None
    return len(data), crc32(data)


def file_crc32(path: Path) -> int:
    """CRC-32 of the whole file at ``path`` (:func:`~shardwise.checksum.fd_crc32`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_crc32(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def check_against(path: Path, entry: dict, size: int, crc: int | None) -> None:
    """IntegrityError naming ``path`` unless ``size`` (and ``crc``, when given) are what the manifest ``entry`` lists."""
    if size != entry["size"]:
        raise IntegrityError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
    if crc is not None and crc != int(entry["crc32"], 16):
        raise IntegrityError(f"{path}: CRC-32 {crc:08x} does not match the manifest's {entry['crc32']} (the file is corrupted)")


def check_file(path: Path, entry: dict, verify: bool = True) -> None:
    """IntegrityError naming ``path`` unless it exists with the manifest ``entry``'s size (and CRC-32, when ``verify``)."""
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (the checkpoint's manifest lists it)")
    check_against(path, entry, path.stat().st_size, file_crc32(path) if verify else None)


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(error: Exception) -> str:
    """The informative line of a loading error (torch wraps it in paragraphs of general advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(_TORCH_ADVICE)]
    pointed = [line for line in lines if "WeightsUnpickler error" in line]  # torch's own reason, among its advice
    return ((pointed or lines)[0].split(". ")[0] if lines else type(error).__name__)[:160]


def _screen(source: Path | Region, f) -> None:
    """Refuse, before ``torch.load`` unpickles anything, what shardwise's restricted reader refuses.

    :func:`~shardwise.formats.torch_pickle.read_torch_pickle` reads the pickle (``f`` is open on the
    same bytes) under shardwise's allow-list and structure limits, which torch's ``weights_only``
    loader lacks (a self-sharing tuple as a dict key makes it hash for 2^80 steps). Files whose
    pickle torch would find elsewhere than that reader are refused too (:func:`_one_pickle`), so the
    pickle checked is the pickle torch loads. Raises FormatError or UnsafeCheckpointError naming the file.
    """
    from ..formats.torch_pickle import read_torch_pickle

    label = str(source.label if isinstance(source, Region) else source)
    try:
        _one_pickle(f, label)
        read_torch_pickle(source)
    except FormatError as e:  # worded as torch.load's failures are, the reader's reason kept
        reason = str(e).removeprefix(f"{label}: ")
        raise FormatError(f"{label}: not a readable torch file, or truncated ({reason})") from None


def _one_pickle(f, label) -> None:
    """FormatError unless torch's reader and shardwise's must pick the same pickle in the file open as ``f``.

    They disagree on a zip with two members of one name (torch takes the first, Python's zipfile the
    last) or several ``data.pkl`` (torch takes the one in the first member's folder), and on a
    legacy pickle that is also a tar header (torch then reads its pre-1.0 tar format).
    """
    head = f.read(tarfile.BLOCKSIZE)
    f.seek(0)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(f) as archive:  # leaves ``f`` open
                names = [info.filename for info in archive.infolist()]
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise FormatError(f"{label}: its zip directory cannot be read ({e})") from None
        finally:
            f.seek(0)
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(set(names)) != len(names) or len(pickles) != 1:
            raise FormatError(f"{label}: refused: the zip archive holds duplicate member names or not exactly one data.pkl (readers disagree on which counts)")
        return
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return
    raise FormatError(f"{label}: refused: the file is both a pickle and a tar archive (readers disagree on which pickle counts)")


def torch_load(path: Path | Region, trust_pickle: bool, mapped: bool = False, allowed: tuple = ()) -> Any:
    """``torch.load`` on CPU, ``weights_only`` unless ``trust_pickle``: tensors, containers and numbers
    load, any other class is refused (UnsafeCheckpointError) before anything runs; unreadable or
    truncated files are a FormatError; both name the file (a :class:`Region`: its label) in one line.

    Without ``trust_pickle`` the file is first read by shardwise's restricted reader (:func:`_screen`):
    what that reader refuses (globals off its allow-list, structures built to hang or exhaust
    memory) never reaches ``torch.load``; what it accepts loads exactly as ``torch.load`` gives it.

    ``mapped`` returns tensors backed by a private map of the file (no copy now, copy-on-write
    later): for states that are copied into place right away, as ``Module.load_state_dict`` does.
    ``allowed`` adds classes that ``weights_only`` may rebuild (inert ones: their construction and
    state setting run no code of the file's choosing).
    """
    import pickle
    import warnings

    import torch

    from ..formats.torch_pickle import looks_like_torch

    region = path if isinstance(path, Region) else None
    if region is not None:
        path = region.label
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)), (open(path, "rb") if region is None else open_region(region)) as f:
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            if not looks_like_torch(f.read(16)):  # garbage would otherwise read as a pickle refused for its opcodes
                raise FormatError(f"{path}: not a readable torch file, or damaged (it starts as neither a zip archive nor a torch pickle)")
            f.seek(0)
            if not trust_pickle:
                _screen(path if region is None else region, f)
            return torch.load(path if region is None else f, map_location="cpu", weights_only=not trust_pickle, mmap=mapped and region is None)
    except FormatError:
        raise
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise FormatError(f"{path}: cannot be unpickled ({_reason(e)})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it pickles objects beyond tensors, containers and numbers ({_reason(e)}); "
            f"pass --trust-pickle (trust_pickle=True) only if you trust where it came from"
        ) from None
    except (RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError) as e:
        raise FormatError(f"{path}: not a readable torch file, or truncated ({type(e).__name__}: {_reason(e)})") from None
