"""Executing tiles: write a tiled tensor's bytes to a file, reading only the source rows it needs.

The output is written top to bottom in bands of rows that the same tiles cover.

- A band that is one run of whole source rows (a row split, a KV head, a vocabulary slice) is a
  byte copy through two alternating 16 MiB buffers, the way the conversion engine copies
  tensors: no torch tensor is built.
- Any other band (columns of a row-parallel weight, side-by-side shards being merged, zero
  padding) is built chunk by chunk in plain bytes: at most ~16 MiB of output rows, from the same
  rows of each source read whole (rows are contiguous on disk, columns are not). Only dtype
  casts and strided sources use torch; column slices use numpy views, so a plain conversion
  never imports torch.

So memory is bounded by a chunk times the TP degree, never by a tensor. Sources stored with
strides (torch files written from transposed views, as NxD writes o_proj) are read whole once
and kept until the next tensor.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Hashable

from ..atomic import write_all
from ..dtypes import dtype as dtype_row
from ..progress import NO_PROGRESS, Progress
from ..tensors import FileTensorSource, StoredTensor, tensor_bytes
from .tiles import Tile, TiledTensor, matrix_shape

__all__ = ["TileStreamer", "CHUNK_BYTES"]

CHUNK_BYTES = 16 * 1024 * 1024
Lookup = Callable[[Hashable], tuple[FileTensorSource, StoredTensor]]


class TileStreamer:
    """Writes tiled tensors whose tiles name sources that ``lookup(ref)`` resolves to a file.

    One instance per conversion (it owns two reusable buffers); not thread-safe. ``cast`` is an
    output dtype name for floating tensors, or None to keep bytes as they are.
    """

    def __init__(self, lookup: Lookup, progress: Progress = NO_PROGRESS, cast: str | None = None) -> None:
        self.lookup = lookup
        self.progress = progress
        self.cast = cast
        self._buffers = (memoryview(bytearray(CHUNK_BYTES)), memoryview(bytearray(CHUNK_BYTES)))
        self._turn = 0
        self._whole: tuple[Hashable, object] | None = None  # a strided source read whole, kept for one tensor

    def out_dtype(self, dtype: str) -> str:
        """The dtype ``dtype`` is written as under this streamer's cast."""
        if self.cast is None or not dtype_row(dtype).castable:
            return dtype
        return self.cast

    def write(self, tensor: TiledTensor, sink: BinaryIO) -> None:
        """Write ``tensor`` (row-major, in its output dtype) to ``sink``."""
        rows, cols = tensor.matrix
        dtype = tensor.info.dtype
        try:
            for start, stop, tiles in _bands(tensor.tiles, rows):
                if self._is_copy(tiles, cols, dtype):
                    self._copy_rows(tiles[0], start, stop, cols, sink)
                else:
                    self._build_rows(tiles, start, stop, cols, dtype, sink)
        finally:
            self._whole = None

    # -- byte copies ---------------------------------------------------------------------------
    def _is_copy(self, tiles: list[Tile], cols: int, dtype: str) -> bool:
        if len(tiles) != 1 or tiles[0].src is None or tiles[0].cols != cols or tiles[0].src_col != 0:
            return False
        if self.out_dtype(dtype) != dtype:
            return False
        _, entry = self.lookup(tiles[0].src)
        return entry.contiguous and matrix_shape(entry.info.shape)[1] == cols

    def _copy_rows(self, tile: Tile, start: int, stop: int, cols: int, sink: BinaryIO) -> None:
        source, entry = self.lookup(tile.src)
        row_bytes = cols * entry.info.itemsize
        offset = entry.offset + (tile.src_row + start - tile.row) * row_bytes
        remaining = (stop - start) * row_bytes
        while remaining:
            self._turn ^= 1
            n = min(remaining, CHUNK_BYTES)
            chunk = self._buffers[self._turn][:n]
            source.read_into(entry, offset, chunk)
            write_all(sink, chunk)
            offset += n
            remaining -= n
            self.progress.advance(n)

    # -- built rows ----------------------------------------------------------------------------
    def _build_rows(self, tiles: list[Tile], start: int, stop: int, cols: int, dtype: str, sink: BinaryIO) -> None:
        if self.out_dtype(dtype) != dtype or any(t.src is not None and not self.lookup(t.src)[1].contiguous for t in tiles):
            return self._build_rows_torch(tiles, start, stop, cols, dtype, sink)
        itemsize = dtype_row(dtype).itemsize
        row_bytes = cols * itemsize
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for first in range(start, stop, step):
            count = min(stop, first + step) - first
            out = bytearray(count * row_bytes)  # zero-filled: zero tiles (vocabulary padding) need no work
            for tile in tiles:
                if tile.src is not None:
                    self._place(tile, first, count, out, row_bytes, itemsize)
            write_all(sink, memoryview(out))
            self.progress.advance(len(out))

    def _place(self, tile: Tile, first: int, count: int, out: bytearray, row_bytes: int, itemsize: int) -> None:
        """Copy rows ``first:first+count`` of the band from ``tile``'s source into ``out`` (numpy views, no torch)."""
        import numpy as np

        source, entry = self.lookup(tile.src)
        src_row_bytes = matrix_shape(entry.info.shape)[1] * itemsize
        width, src_at, out_at = tile.cols * itemsize, tile.src_col * itemsize, tile.col * itemsize
        offset = entry.offset + (tile.src_row + first - tile.row) * src_row_bytes
        if width == row_bytes == src_row_bytes:
            source.read_into(entry, offset, memoryview(out))
            return
        rows = np.empty((count, src_row_bytes), dtype=np.uint8)
        source.read_into(entry, offset, memoryview(rows).cast("B"))
        np.frombuffer(out, dtype=np.uint8).reshape(count, row_bytes)[:, out_at:out_at + width] = rows[:, src_at:src_at + width]

    def _build_rows_torch(self, tiles: list[Tile], start: int, stop: int, cols: int, dtype: str, sink: BinaryIO) -> None:
        """Casts and strided sources: built with torch, chunk by chunk."""
        import torch

        torch_dtype = dtype_row(dtype).torch()
        out_dtype = dtype_row(self.out_dtype(dtype)).torch()
        step = max(1, CHUNK_BYTES // max(1, cols * dtype_row(dtype).itemsize))
        for first in range(start, stop, step):
            last = min(stop, first + step)
            out = torch.zeros((last - first, cols), dtype=torch_dtype)
            for tile in tiles:
                if tile.src is not None:
                    rows = self._source_rows(tile.src, tile.src_row + first - tile.row, last - first)
                    out[:, tile.col:tile.col + tile.cols].copy_(rows[:, tile.src_col:tile.src_col + tile.cols])
            if out_dtype != torch_dtype:
                out = out.to(out_dtype)
            write_all(sink, tensor_bytes(out))
            self.progress.advance(out.numel() * out.element_size())

    def _source_rows(self, ref: Hashable, first: int, count: int):
        source, entry = self.lookup(ref)
        shape = matrix_shape(entry.info.shape)
        if entry.contiguous:
            return source.read_rows(entry.info.name, first, first + count).reshape(count, shape[1])
        if self._whole is None or self._whole[0] != ref:
            self._whole = (ref, source.read(entry.info.name).reshape(shape))
        return self._whole[1][first:first + count]


def _bands(tiles: tuple[Tile, ...], rows: int) -> list[tuple[int, int, list[Tile]]]:
    """Row ranges in which the same tiles are present, top to bottom, each with its tiles by column."""
    cuts = sorted({0, rows, *(t.row for t in tiles), *(t.row + t.rows for t in tiles)})
    bands = []
    for start, stop in zip(cuts, cuts[1:]):
        present = sorted((t for t in tiles if t.row < stop and start < t.row + t.rows), key=lambda t: t.col)
        if present:
            bands.append((start, stop, present))
    return bands
