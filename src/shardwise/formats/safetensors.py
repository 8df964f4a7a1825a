"""The safetensors format: an 8-byte header length, a JSON header, then raw little-endian data.

Reading parses and validates only the header (no torch import, no data read), so describing a
multi-GiB file takes milliseconds. Writing streams: the header is computed from the tensor
descriptions alone, then each tensor's bytes are produced by a callback, one at a time. Files are
byte-identical to what the ``safetensors`` library writes for the same tensors and metadata
(same ordering: largest dtype first, then name; same JSON; same space padding to 8 bytes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import BinaryIO, Callable

from .. import dtypes
from ..atomic import write_all
from ..errors import FormatError
from ..jsonfile import collector_paused, parse_json
from ..tensors import FileTensorSource, StoredTensor, TensorInfo
from .region import Region, as_region, open_region

__all__ = ["SafetensorsFile", "looks_like_safetensors", "safetensors_order", "check_writable", "write_safetensors", "MAX_HEADER"]

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """The object of ``pairs``; _DuplicateKey when a key repeats (found in C, not a Python loop per key)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return out


def looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """True when the first bytes of a file are a plausible safetensors header start."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER and 8 + n <= max(file_size, 9) and head[8:9] == b"{"


class SafetensorsFile(FileTensorSource):
    """One ``.safetensors`` file as a lazy tensor source.

    ``metadata`` holds the header's ``__metadata__`` (str -> str). Opening validates the header
    completely: known dtypes, shapes that match byte lengths, offsets inside the data section and
    not overlapping, and a file long enough to hold them; any violation is a FormatError naming the
    file and the tensor.

    >>> with SafetensorsFile("model.safetensors") as st:  # doctest: +SKIP
    ...     st.info("embeddings.word_embeddings.weight")
    """

    format_name = "safetensors"

    def __init__(self, path: str | os.PathLike | Region) -> None:
        super().__init__()
        self.region = as_region(path)
        self.path = self.region.label
        self.metadata: dict[str, str] = {}
        with collector_paused():  # a header of a million tensors: millions of objects, no cycles
            self._parse_header()

    def _parse_header(self) -> None:
        path, region = self.path, self.region
        size = region.size
        if size == 0:
            raise FormatError(f"{path}: file is empty")
        with open_region(region) as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: file is truncated: {len(head)} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise FormatError(f"{path}: corrupted safetensors header: declared header length {n} exceeds {MAX_HEADER}")
            if 8 + n > size:
                raise FormatError(
                    f"{path}: file is truncated: the header declares {n} bytes but the file holds {size - 8} after the length"
                )
            raw = f.read(n)
        try:
            header = parse_json(raw, path, "the safetensors header", object_pairs_hook=_refuse_duplicate_keys)
        except _DuplicateKey as e:
            raise FormatError(f"{path}: corrupted safetensors header: the key {e.args[0]!r} appears twice") from None
        if not isinstance(header, dict):
            raise FormatError(f"{path}: corrupted safetensors header: the header is not a JSON object")
        data_start = 8 + n
        data_size = size - data_start
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FormatError(f"{path}: corrupted safetensors header: __metadata__ must map strings to strings")
        self.metadata = metadata
        spans = []
        for name, entry in header.items():
            info, begin, end = self._parse_entry(name, entry)
            if end > data_size:
                raise FormatError(
                    f"{path}: file is truncated: tensor '{name}' ends at data offset {end} "
                    f"but the data section holds {data_size} bytes"
                )
            spans.append((begin, end, name))
            self._tensors[name] = StoredTensor(info, region.path, region.start + data_start + begin)
        spans.sort()
        # like the reference implementation: tensors tile the data section exactly, no gaps, no tail
        position = 0
        for begin, end, name in spans:
            if begin < position:
                raise FormatError(f"{path}: corrupted safetensors header: tensor '{name}' overlaps the one before it")
            if begin > position:
                raise FormatError(f"{path}: corrupted safetensors header: {begin - position} unused bytes before tensor '{name}'")
            position = end
        if position != data_size:
            raise FormatError(
                f"{path}: corrupted safetensors file: {data_size - position} bytes after the last tensor that no tensor describes"
            )
        # keep tensors in on-disk order, so that a full pass reads the file sequentially
        self._tensors = {name: self._tensors[name] for _, _, name in spans}

    def _parse_entry(self, name: str, entry: object) -> tuple[TensorInfo, int, int]:
        """The tensor header ``entry`` describes, and its data's [begin, end); FormatError otherwise.
        Runs once per tensor (a million for some files): the checks are plain comparisons (JSON
        gives exact ``int`` and ``bool`` types) and messages are built only on failure."""
        if type(entry) is not dict:
            raise self._bad(name, "is not described by an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        row = dtypes.from_safetensors(code) if type(code) is str else None
        if row is None:
            raise self._bad(name, f"has dtype {code!r}, which shardwise does not read")
        if type(shape) is not list or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
            raise self._bad(name, f"has shape {shape!r}; expected a list of non-negative integers")
        if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int and 0 <= offsets[0] <= offsets[1]):
            raise self._bad(name, f"has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
        begin, end = offsets
        nbytes = math.prod(shape) * row.itemsize
        if end - begin != nbytes:
            raise self._bad(name, f"has shape {shape} of {row.name} ({nbytes} bytes) but its data_offsets span {end - begin} bytes")
        return TensorInfo(name, tuple(shape), row.name), begin, end

    def _bad(self, name: str, problem: str) -> FormatError:
        return FormatError(f"{self.path}: corrupted safetensors header: tensor '{name}' {problem}")


def safetensors_order(infos: list[TensorInfo]) -> list[TensorInfo]:
    """The order tensors take in a file: dtype by descending enum rank, then name (as the library does).

    Largest element types first keeps every tensor aligned to its element size.
    """
    return sorted(infos, key=lambda t: (-dtypes.dtype(t.dtype).safetensors_rank, t.name))


def header_bytes(infos: list[TensorInfo], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorInfo]]:
    """The length-prefixed, space-padded header for ``infos`` and the on-disk order it implies."""
    ordered = safetensors_order(infos)
    header: dict[str, object] = {}
    if metadata is not None:  # as the library does: {} is written, None is left out
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in ordered:  # dtypes were checked by check_writable
        header[info.name] = {"dtype": dtypes.dtype(info.dtype).safetensors, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def check_writable(infos: list[TensorInfo]) -> None:
    """Raise FormatError if these tensors cannot form one safetensors file (names or dtypes)."""
    names = [t.name for t in infos]
    if len(set(names)) != len(names):
        raise FormatError("duplicate tensor names cannot be written to one safetensors file")
    if "__metadata__" in names:
        raise FormatError("a tensor named '__metadata__' cannot be written to safetensors, which reserves that key; rename it")
    for info in infos:
        if dtypes.dtype(info.dtype).safetensors is None:
            raise FormatError(f"tensor '{info.name}' has dtype {info.dtype}, which safetensors cannot store")


def write_safetensors(
    f: BinaryIO,
    infos: list[TensorInfo],
    write_tensor: Callable[[TensorInfo, BinaryIO], None],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file to the open binary file ``f``, streaming tensor data.

    ``write_tensor(info, f)`` is called once per tensor, in on-disk order, and must write exactly
    ``info.nbytes`` little-endian row-major bytes to ``f``.
    Duplicate names, and the reserved name ``__metadata__``, are rejected before anything is written.
    """
    check_writable(infos)
    header, ordered = header_bytes(infos, metadata)
    write_all(f, header)
    for info in ordered:
        start = f.tell()
        write_tensor(info, f)
        written = f.tell() - start
        if written != info.nbytes:
            raise FormatError(f"tensor '{info.name}' produced {written} bytes, expected {info.nbytes}")

