"""Writing and checking the files of a training checkpoint: durable, checksummed on the way out.

:func:`save_object` writes with ``torch.save`` (the payload NxD reads) through a sink that
computes the CRC-32 as bytes go by, then fsyncs; atomicity comes from the tag's staging folder.
:func:`check_file` recomputes size and CRC-32 against the manifest.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ..atomic import write_all
from ..checksum import crc32
from ..errors import IntegrityError
from ..units import CHUNK_BYTES

__all__ = ["save_object", "check_file", "file_crc32"]

_READ_CHUNK = CHUNK_BYTES


class _ChecksummingFile(io.RawIOBase):
    """A write-only file that keeps the CRC-32 and size of what goes through (torch.save only appends)."""

    def __init__(self, f) -> None:
        super().__init__()
        self._f = f
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
        return len(view)

    def flush(self) -> None:
        self._f.flush()


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
        raise OSError(e.errno, f"{path}: writing the checkpoint failed: {e.strerror or e}; earlier checkpoints are untouched") from None
    return sink.size, sink.crc


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ_CHUNK):
            crc = crc32(chunk, crc)
    return crc


def check_file(path: Path, size: int, crc: int | None) -> None:
    """IntegrityError naming ``path`` unless it exists with ``size`` bytes (and CRC-32 ``crc``, when given)."""
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (the checkpoint's manifest lists it)")
    actual = path.stat().st_size
    if actual != size:
        raise IntegrityError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)")
    if crc is not None and file_crc32(path) != crc:
        raise IntegrityError(f"{path}: CRC-32 does not match the manifest (the file is corrupted)")
