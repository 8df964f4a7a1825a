"""A streaming writer of uncompressed ("stored") zip archives, the container of torch checkpoints.

Why not :mod:`zipfile`: it hard-wires ``zlib.crc32`` (about 4 GiB/s here), and the CRC-32 of every
byte was the largest cost of writing torch files. This writer takes the checksum function as a
parameter and uses zlib-ng's when it is installed (about 24 GiB/s, same values). It also puts
every member's data on an ``alignment`` boundary with an "FB" padding extra field, as torch's own
writer does, so that ``torch.load(mmap=True)`` maps tensors in place.

Format: APPNOTE.TXT (PKWARE) 4.3: local header + data per member, then the central directory and
the end records, with zip64 fields where a size, an offset or the member count needs them.
Members are written one at a time; sizes are declared up front and the CRCs are patched into
the local headers by :meth:`StoredZipWriter.close`, all at once (the file must be seekable): a
seek back after every member would stall a background writer at every tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable

from ..atomic import write_all
from ..background import write_small
from ..checksum import crc32, crc32_combine
from ..errors import FormatError

__all__ = ["StoredZipWriter", "crc32"]


_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_U32 = 0xFFFFFFFF
_MADE_ON_UNIX = 3 << 8  # host byte of "version made by": the external attributes below are Unix modes
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, as torch and zipfile write for reproducibility


@dataclass
class _Member:
    name: bytes
    size: int
    crc: int
    header_offset: int
    flags: int


class _MemberSink:
    """What a member's producer writes to: checksums and counts on the way to the file."""

    def __init__(self, f: BinaryIO, checksum: Callable[..., int]) -> None:  # crc32(data[, start])
        self._f = f
        self._checksum = checksum
        self.crc = 0
        self.count = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        piece = self._checksum(view)
        self.crc = crc32_combine(self.crc, piece, len(view))
        self.count += len(view)
        forward = getattr(self._f, "write_checksummed", None)
        if forward is not None:
            forward(view, piece)  # the file's own CRC reuses this one: each byte is checksummed once
        else:
            write_all(self._f, view)
        return len(view)


class StoredZipWriter:
    """Write a stored zip to the seekable binary file ``f``, one member at a time.

    >>> with open("x.zip", "wb") as f:  # doctest: +SKIP
    ...     z = StoredZipWriter(f)
    ...     z.write_member("a/data/0", 4, lambda sink: sink.write(b"\\0" * 4))
    ...     z.close()

    ``close()`` writes the central directory; the file itself is left open. Not thread-safe.
    """

    def __init__(self, f: BinaryIO, *, alignment: int = 64, checksum: Callable = crc32, force_zip64: bool = False) -> None:
        self._f = f
        self._alignment = alignment
        self._checksum = checksum
        self._force_zip64 = force_zip64
        self._members: list[_Member] = []
        self._offset = f.tell()
        self._names: set[bytes] = set()

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write_member(name, len(data), lambda sink: sink.write(data))

    def write_member(self, name: str, size: int, produce: Callable[[_MemberSink], None]) -> None:
        """Write member ``name`` whose data ``produce(sink)`` writes: exactly ``size`` bytes."""
        raw_name = name.encode("utf-8")
        if raw_name in self._names:
            raise FormatError(f"zip member {name!r} written twice")
        self._names.add(raw_name)
        flags = 0 if raw_name.isascii() else 0x800  # bit 11: the name is UTF-8
        zip64 = self._force_zip64 or size >= _U32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = -(self._offset + _LOCAL.size + len(raw_name) + len(extra) + 4) % self._alignment
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch writes
        header_offset = self._offset
        write_small(self._f, _LOCAL.pack(
            0x04034B50, 45 if zip64 else 20, flags, 0, 0, _DOS_DATE, 0,
            _U32 if zip64 else size, _U32 if zip64 else size, len(raw_name), len(extra),
        ) + raw_name + extra)
        sink = _MemberSink(self._f, self._checksum)
        produce(sink)
        if sink.count != size:
            raise FormatError(f"zip member {name!r} received {sink.count} bytes, {size} were declared")
        self._offset = header_offset + _LOCAL.size + len(raw_name) + len(extra) + size
        self._members.append(_Member(raw_name, size, sink.crc, header_offset, flags))

    def close(self) -> None:
        """Patch every member's CRC into its local header, then write the central directory and end
        records (zip64 ones where needed)."""
        start = self._offset
        for m in self._members:
            self._f.seek(m.header_offset + 14)  # the CRC field of the local header
            write_all(self._f, struct.pack("<I", m.crc))
        self._f.seek(start)
        directory = bytearray()
        for m in self._members:
            big_size = self._force_zip64 or m.size >= _U32
            big_offset = self._force_zip64 or m.header_offset >= _U32
            fields = ([m.size, m.size] if big_size else []) + ([m.header_offset] if big_offset else [])
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            version = 45 if fields else 20
            directory += _CENTRAL.pack(
                0x02014B50, _MADE_ON_UNIX | version, version, m.flags, 0, 0, _DOS_DATE, m.crc,
                _U32 if big_size else m.size, _U32 if big_size else m.size, len(m.name), len(extra), 0, 0, 0,
                0o600 << 16, _U32 if big_offset else m.header_offset,
            ) + m.name + extra
        write_all(self._f, directory)
        end64_offset = start + len(directory)
        count, size = len(self._members), len(directory)
        if self._force_zip64 or count >= 0xFFFF or start >= _U32 or size >= _U32:
            write_all(self._f, _END64.pack(0x06064B50, 44, 45, 45, 0, 0, count, count, size, start))
            write_all(self._f, _LOCATOR64.pack(0x07064B50, 0, end64_offset, 1))
            count16, size32, start32 = 0xFFFF, _U32, _U32
        else:
            count16, size32, start32 = count, size, start
        write_all(self._f, _END.pack(0x06054B50, 0, 0, count16, count16, size32, start32, 0))
