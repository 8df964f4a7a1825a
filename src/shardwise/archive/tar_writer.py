"""Writing tar archives member by member, streaming data whose size is known only afterwards.

Members are named ``./NAME`` as NeMo writes them (``tar.add(folder, arcname=".")``). Headers
use the GNU format, which Python's ``tarfile``, GNU tar and bsdtar all read: sizes of 8 GiB and
more are written in base-256 in the same 512-byte header, so a streamed member's header can be
rewritten in place once its size is known. Every member's CRC-32 is computed on the way through,
for the archive manifest.
"""

from __future__ import annotations

import os
import tarfile
import time
from typing import BinaryIO, Callable

from ..atomic import write_all
from ..background import write_small
from ..errors import FormatError
from ..checksum import crc32, crc32_combine, crc32_patched

__all__ = ["TarWriter", "MemberSink", "WrittenMember"]

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar pads archives to whole records, as tarfile and GNU tar do
_COPY_CHUNK = 8 << 20


class WrittenMember:
    """What the writer recorded about a member: normalised name, size, data offset, CRC-32."""

    __slots__ = ("name", "size", "offset", "crc32")

    def __init__(self, name: str, size: int, offset: int, crc: int) -> None:
        self.name, self.size, self.offset, self.crc32 = name, size, offset, crc


class MemberSink:
    """A member's data stream: a seekable file whose position 0 is the member's first byte.

    Writers that patch earlier bytes (the zip writer of torch files seeks back to fill in each
    entry's CRC) may seek back within what they wrote; the member's CRC-32 is kept right by
    reading back the few bytes being replaced (:func:`~shardwise.checksum.crc32_patched`), so the
    archive file must be open for reading as well as writing (mode ``"w+b"``).
    """

    def __init__(self, f: BinaryIO, start: int) -> None:
        self._f = f
        self._start = start
        self._end = start  # absolute offset just past the furthest byte written
        self._position = start
        self.crc = 0

    def write(self, data) -> int:
        return self._write(data, None, small=False)

    def write_copy(self, data) -> int:
        """Append small bytes the caller built itself (a header), through the file's ``write_copy``
        where it has one (see :func:`~shardwise.background.write_small`)."""
        return self._write(data, None, small=True)

    def write_checksummed(self, data, piece_crc: int | None) -> int:
        """``write(data)`` when the caller already knows ``crc32(data)`` (``piece_crc``): appended
        bytes are then not checksummed a second time."""
        return self._write(data, piece_crc, small=False)

    def _write(self, data, piece_crc: int | None, small: bool) -> int:
        """Every write: appended bytes extend the CRC (by ``piece_crc`` when known) and go through
        ``write_small`` if ``small``; bytes overwritten after a seek back patch it."""
        view = memoryview(data).cast("B")
        if self._position == self._end:
            self.crc = crc32(view, self.crc) if piece_crc is None else crc32_combine(self.crc, piece_crc, len(view))
            self._end += len(view)
            if small:
                write_small(self._f, view)
            else:
                write_all(self._f, view)
        else:
            if self._position + len(view) > self._end:
                raise FormatError("a streamed archive member may only overwrite bytes it already wrote")
            self._f.flush()
            old = os.pread(self._f.fileno(), len(view), self._position)
            self.crc = crc32_patched(self.crc, old, bytes(view), self._end - self._position - len(view))
            write_all(self._f, view)
        self._position += len(view)
        return len(view)

    def tell(self) -> int:
        return self._position - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or not 0 <= offset <= self.size:
            raise ValueError("member sinks seek from the start, within what was written")
        self._position = self._f.seek(self._start + offset)
        return offset

    def flush(self) -> None:
        self._f.flush()

    @property
    def size(self) -> int:
        return self._end - self._start


class MemberWriter:
    """What archive-like writers share: members from bytes or files, both through ``add_stream``."""

    def add_stream(self, name: str, produce: Callable[[MemberSink], None]) -> WrittenMember:
        raise NotImplementedError

    def add_bytes(self, name: str, data: bytes) -> WrittenMember:
        return self.add_stream(name, lambda sink: sink.write(data))

    def add_file(self, name: str, path: str | os.PathLike) -> WrittenMember:
        """Copy the regular file at ``path`` in, chunk by chunk."""

        def copy(sink: MemberSink) -> None:
            with open(path, "rb", buffering=0) as src:
                while chunk := src.read(_COPY_CHUNK):
                    sink.write(chunk)

        return self.add_stream(name, copy)


class TarWriter(MemberWriter):
    """Writes an uncompressed tar to the seekable binary file ``f``.

    >>> with open("a.tar", "wb") as f:  # doctest: +SKIP
    ...     tar = TarWriter(f)
    ...     tar.add_dir("")
    ...     tar.add_bytes("model_config.yaml", b"a: 1\\n")
    ...     tar.close()

    Names are given normalised (``mp_rank_00/model_weights.ckpt``) and written as ``./NAME``.
    ``members`` lists every regular file written, in order. The file is left open. Not thread-safe.
    """

    def __init__(self, f: BinaryIO, *, mtime: int | None = None) -> None:
        self._f = f
        self._mtime = int(os.environ.get("SOURCE_DATE_EPOCH", time.time())) if mtime is None else mtime
        self.members: list[WrittenMember] = []
        self._names: set[str] = set()

    def _header(self, name: str, size: int, kind: bytes, mode: int) -> bytes:
        info = tarfile.TarInfo("./" + name if name else ".")
        info.size, info.type, info.mode, info.mtime = size, kind, mode, self._mtime
        info.uname = info.gname = ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise FormatError(f"archive member {name!r} written twice")
        self._names.add(name)

    def add_dir(self, name: str) -> None:
        """A folder entry (``""`` is the archive root, written as ``.``)."""
        self._claim(name + "/")
        write_all(self._f, self._header(name, 0, tarfile.DIRTYPE, 0o755))

    def add_stream(self, name: str, produce: Callable[[MemberSink], None]) -> WrittenMember:
        """Add regular file ``name`` whose bytes ``produce(sink)`` writes; returns what was written."""
        self._claim(name)
        header_offset = self._f.tell()
        header = self._header(name, 0, tarfile.REGTYPE, 0o644)
        write_all(self._f, header)
        sink = MemberSink(self._f, header_offset + len(header))
        produce(sink)
        size, crc = sink.size, sink.crc
        final = self._header(name, size, tarfile.REGTYPE, 0o644)
        if len(final) != len(header):
            raise FormatError(f"archive member {name!r}: header length changed while streaming")
        self._f.seek(header_offset)
        write_all(self._f, final)
        self._f.seek(header_offset + len(header) + size)
        write_all(self._f, bytes(-size % _BLOCK))
        member = WrittenMember(name, size, header_offset + len(header), crc)
        self.members.append(member)
        return member

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and pad to a whole record."""
        end = self._f.tell() + 2 * _BLOCK
        write_all(self._f, bytes(2 * _BLOCK + (-end % _RECORD)))
