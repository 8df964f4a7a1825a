"""A byte range of a file, read as if it were a file of its own.

Archives keep their members whole and uncompressed, so a member (a safetensors or torch file
inside a ``.nemo`` tar) is just bytes ``[start, start + size)`` of the archive. Readers take a
:class:`Region` instead of a path and never need the member extracted: tensors found in it are
recorded at their absolute offsets in the archive, and errors name ``archive:member``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

__all__ = ["Region", "as_region", "open_region"]


@dataclass(frozen=True)
class Region:
    """Bytes ``[start, start + size)`` of the file at ``path``; ``label`` is how messages name it."""

    path: str
    start: int
    size: int
    label: str

    @staticmethod
    def whole_file(path: str | os.PathLike) -> "Region":
        path = os.fspath(path)
        return Region(path, 0, os.path.getsize(path), path)


def as_region(path_or_region: "str | os.PathLike | Region") -> Region:
    """A :class:`Region` as given, or the whole file at a path."""
    if isinstance(path_or_region, Region):
        return path_or_region
    return Region.whole_file(path_or_region)


class _RegionReader(io.RawIOBase):
    """A read-only, seekable raw file over a region, reading with ``pread`` (no shared file position)."""

    def __init__(self, region: Region) -> None:
        super().__init__()
        self._region = region
        self._fd = os.open(region.path, os.O_RDONLY)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._region.size}[whence]
        if base + offset < 0:
            raise OSError(f"{self._region.label}: negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._region.size - self._pos))
        if n == 0:
            return 0
        data = os.pread(self._fd, n, self._region.start + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_region(region: Region) -> io.BufferedReader:
    """A buffered binary file over ``region``: offset 0 is ``region.start``, EOF is at ``region.size``."""
    return io.BufferedReader(_RegionReader(region), buffer_size=1 << 16)
