"""Byte sizes: parsing ``--max-shard-size`` values, printing sizes for people, and the streaming chunk size."""

from __future__ import annotations

import re

from .errors import OptionError

__all__ = ["parse_size", "format_bytes", "CHUNK_BYTES"]

CHUNK_BYTES = 16 * 1024 * 1024  # what streaming code reads, gathers or checksums at once

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a size as HuggingFace does: ``"5GB"`` is 5*10**9 bytes, ``"2GiB"`` 2*2**30, ``"1000"`` bytes.

    >>> parse_size("500MB")
    500000000
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise OptionError(
                f"size {text!r} is not understood; write a number with an optional unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), for example 5GB or 512MiB"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OptionError(f"size {text!r} must be larger than zero")
    return value


def format_bytes(n: int | float) -> str:
    """A short human-readable size in binary units (``1.5 GiB``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
