"""CRC-32 (the zip/gzip/PNG polynomial), fast, and the algebra to patch it.

:func:`crc32` is zlib-ng's when installed (about 24 GiB/s here, against 4 GiB/s for zlib; same
values). :func:`crc32_patched` updates the CRC of a stream after a few of its bytes were
overwritten in place, without reading the stream again: CRC-32 is affine over GF(2), so the
change equals the CRC difference of the old and new bytes, shifted past the bytes that follow.
That lets archive members be checksummed while streaming even though the torch zip writer seeks
back to patch each entry's CRC field.
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib

from .units import CHUNK_BYTES

__all__ = ["crc32", "crc32_shift", "crc32_combine", "crc32_patched", "fd_crc32"]

try:
    from zlib_ng.zlib_ng import crc32, crc32_combine as _combine
except ImportError:  # pragma: no cover - exercised where zlib-ng is missing
    crc32 = zlib.crc32
    _combine = None

_POLY = 0xEDB88320  # reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, in the reflected bit order CRC-32 uses."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_shift(crc: int, nbytes: int) -> int:
    """The linear part of appending ``nbytes`` zero bytes: what ``crc32_combine(crc, 0, nbytes)`` gives."""
    if _combine is not None:
        return _combine(crc, 0, nbytes)
    power, k = 1 << 31, 3  # x^0; bytes are 8 = 2^3 bits
    while nbytes:
        if nbytes & 1:
            power = _multmodp(_X2N[k & 31], power)
        nbytes >>= 1
        k += 1
    return _multmodp(power, crc)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC of ``a + b`` from ``crc1`` = CRC(a), ``crc2`` = CRC(b) and ``len2`` = len(b), without reading either.

    >>> crc32_combine(crc32(b"head"), crc32(b"tail!"), 5) == crc32(b"headtail!")
    True
    """
    return crc32_shift(crc1, len2) ^ crc2


def crc32_patched(crc: int, old: bytes, new: bytes, bytes_after: int) -> int:
    """The CRC of a stream whose bytes ``old`` were replaced by ``new`` (same length), followed by
    ``bytes_after`` more bytes, given the stream's CRC ``crc`` before the change.

    >>> data = bytearray(b"header:0000;payload")
    >>> before = crc32(data)
    >>> data[7:11] = b"abcd"
    >>> crc32_patched(before, b"0000", b"abcd", 8) == crc32(data)
    True
    """
    if len(old) != len(new):
        raise ValueError("a patch replaces bytes with as many bytes")
    return crc ^ crc32_shift(crc32(old) ^ crc32(new), bytes_after)


def fd_crc32(fd: int, start: int, size: int, stop: threading.Event | None = None) -> int:
    """CRC-32 of bytes ``start:start+size`` of the open file ``fd``, a 16 MiB map of its pages at a
    time (0 when ``stop`` is set before the end). The caller checks the file holds those bytes.

    Maps, not reads: CRC-ing cached pages in place measured about 4x faster here than ``preadv``
    into a buffer (the copy dominates), and a conversion reading the same file maps the same pages.
    A filesystem that cannot map is read instead. A file truncated under the map kills the process
    with SIGBUS, as it does for the conversion's own maps.
    """
    crc, done = 0, 0
    while done < size and not (stop is not None and stop.is_set()):
        n = min(CHUNK_BYTES, size - done)
        crc = crc32(_chunk(fd, start + done, n), crc)
        done += n
    return crc


def _chunk(fd: int, offset: int, length: int) -> memoryview:
    """Bytes ``offset:offset+length`` of ``fd``, mapped (unmapped when the view is dropped) or, where mapping fails, read."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(fd, offset + length - aligned, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=aligned)
    except OSError:  # some FUSE mounts cannot map
        return memoryview(os.pread(fd, length, offset))
    return memoryview(mapping)[offset - aligned:]
