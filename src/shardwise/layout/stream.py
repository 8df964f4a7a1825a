"""Executing tiles: write a tiled tensor's bytes to a file, touching only the source rows it needs.

Sources are read through read-only maps of their files' pages (no copy into this process; pages
are faulted in as they are read, which measured faster than populating each map up front), and
mapped a chunk at a time: never a whole tensor. The output is
written top to bottom in bands of rows that the same tiles cover.

- A band that is one run of whole source rows (a row split, a KV head, a vocabulary slice) is
  written straight from the mapped pages in 16 MiB slices: the kernel's copy into the output
  file is the only copy, and no torch tensor is built.
- Any other band (columns of a row-parallel weight, side-by-side shards being merged, zero
  padding) is gathered chunk by chunk into two alternating 16 MiB buffers with numpy views of
  the mapped source rows; a chunk has as many rows as fit 16 MiB of the widest row involved, so
  what is mapped at once stays near 16 MiB per tile.
- Only dtype casts and strided sources (torch files written from transposed views, as NxD
  writes o_proj) use torch: those are read, a strided source whole once per tensor.

So memory is bounded by a few chunks per tile, never by a tensor, and a plain conversion never
imports torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import BinaryIO, Callable, Hashable

from ..atomic import write_all
from ..dtypes import dtype as dtype_row
from ..errors import LayoutError
from ..progress import NO_PROGRESS, Progress
from ..units import CHUNK_BYTES
from ..tensors import FileTensorSource, StoredTensor, TensorInfo, tensor_bytes
from .tiles import Tile, TiledTensor, matrix_shape

__all__ = ["TileStreamer", "CHUNK_BYTES", "read_tiled", "TiledSource"]

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
        self._buffers = (bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES))
        self._turn = 0
        self._whole: tuple[Hashable, object] | None = None  # a strided source read whole, kept for one tensor

    def twin(self, progress: Progress | None = None) -> "TileStreamer":
        """A new streamer with the same lookup and cast and its own buffers (for another thread),
        reporting to ``progress`` (default: this one's)."""
        return TileStreamer(self.lookup, self.progress if progress is None else progress, self.cast)

    def out_dtype(self, dtype: str) -> str:
        """The dtype ``dtype`` is written as under this streamer's cast."""
        if self.cast is None or not dtype_row(dtype).castable:
            return dtype
        return self.cast

    def write(self, tensor: TiledTensor, sink: BinaryIO) -> None:
        """Write ``tensor`` (row-major, in its output dtype) to ``sink``.

        ``sink.write`` may keep a view of the data it is given until its next ``write`` or waiting
        call (a background writer): views of mapped pages keep their mapping alive, and the gather
        buffers alternate, every chunk going through ``write``.
        """
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

    def _mapped_rows(self, ref: Hashable, first: int, count: int) -> memoryview:
        """Rows ``first:first+count`` of a contiguous source, mapped (unmapped when the view is dropped)."""
        source, entry = self.lookup(ref)
        row_bytes = matrix_shape(entry.info.shape)[1] * entry.info.itemsize
        return source.mapped_bytes(entry, first * row_bytes, count * row_bytes)

    def _buffer(self, nbytes: int) -> memoryview:
        self._turn ^= 1
        return memoryview(self._buffers[self._turn])[:nbytes]

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
        first = (tile.src_row + start - tile.row) * cols * entry.info.itemsize
        length = (stop - start) * cols * entry.info.itemsize
        for at in range(first, first + length, CHUNK_BYTES):
            chunk = source.mapped_bytes(entry, at, min(CHUNK_BYTES, first + length - at))  # one chunk mapped at a time
            write_all(sink, chunk)
            self.progress.advance(len(chunk))

    # -- built rows ----------------------------------------------------------------------------
    def _build_rows(self, tiles: list[Tile], start: int, stop: int, cols: int, dtype: str, sink: BinaryIO) -> None:
        if self.out_dtype(dtype) != dtype or any(t.src is not None and not self.lookup(t.src)[1].contiguous for t in tiles):
            return self._build_rows_torch(tiles, start, stop, cols, dtype, sink)
        import numpy as np

        itemsize = dtype_row(dtype).itemsize
        row_bytes = cols * itemsize
        covered = sum(t.cols for t in tiles if t.src is not None) == cols
        widest = max([row_bytes] + [matrix_shape(self.lookup(t.src)[1].info.shape)[1] * itemsize for t in tiles if t.src is not None])
        step = max(1, CHUNK_BYTES // max(1, widest))
        for first in range(start, stop, step):
            count = min(stop, first + step) - first
            nbytes = count * row_bytes
            out = self._buffer(nbytes) if nbytes <= CHUNK_BYTES else memoryview(bytearray(nbytes))  # rows wider than a chunk
            grid = np.frombuffer(out, dtype=np.uint8).reshape(count, row_bytes)
            if not covered:
                grid[:] = 0  # zero tiles: vocabulary padding
            for tile in tiles:
                if tile.src is not None:
                    self._place(tile, first, count, grid, itemsize)
            write_all(sink, out)
            self.progress.advance(nbytes)

    def _place(self, tile: Tile, first: int, count: int, grid, itemsize: int) -> None:
        """Copy rows ``first:first+count`` of the band from ``tile``'s mapped source into ``grid`` (numpy views, no torch)."""
        import numpy as np

        rows = np.frombuffer(self._mapped_rows(tile.src, tile.src_row + first - tile.row, count), dtype=np.uint8).reshape(count, -1)
        width, src_at, out_at = tile.cols * itemsize, tile.src_col * itemsize, tile.col * itemsize
        grid[:, out_at:out_at + width] = rows[:, src_at:src_at + width]

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


class _FillSink:
    """A write-only sink filling a preallocated buffer front to back (the streamer writes row-major, in order)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.view[self.pos:self.pos + len(data)] = data
        self.pos += len(data)
        return len(data)


def read_tiled(streamer: TileStreamer, tensor: TiledTensor):
    """``tensor`` built in memory: a new contiguous CPU ``torch.Tensor`` in the streamer's output dtype.

    The tiles are executed as :meth:`TileStreamer.write` executes them, into the new tensor
    instead of a file: memory is the tensor plus the streamer's chunks. Not thread-safe (the
    streamer's buffers).

    >>> weight = read_tiled(TileStreamer(model.lookup), plan[(0, 0)][0])  # doctest: +SKIP
    """
    import torch

    out = torch.empty(tensor.info.shape, dtype=dtype_row(streamer.out_dtype(tensor.info.dtype)).torch())
    sink = _FillSink(tensor_bytes(out))
    streamer.write(tensor, sink)
    if sink.pos != len(sink.view):  # the tiles must cover the tensor; a gap would leave garbage, not zeros
        raise LayoutError(f"{tensor.info.name}: the tiles wrote {sink.pos} of its {len(sink.view)} bytes")
    return out


def _bands(tiles: tuple[Tile, ...], rows: int) -> list[tuple[int, int, list[Tile]]]:
    """Row ranges in which the same tiles are present, top to bottom, each with its tiles by column."""
    cuts = sorted({0, rows, *(t.row for t in tiles), *(t.row + t.rows for t in tiles)})
    bands = []
    for start, stop in zip(cuts, cuts[1:]):
        present = sorted((t for t in tiles if t.row < stop and start < t.row + t.rows), key=lambda t: t.col)
        if present:
            bands.append((start, stop, present))
    return bands


class TiledSource(FileTensorSource):
    """Tensors assembled from tiles of other files' tensors, as a lazy tensor source.

    Subclasses fill ``self._tiled`` (name -> :class:`TiledTensor`) and implement :meth:`lookup`.
    A tensor one tile covers whole is ``stored()`` in place (its source's bytes, read like any file
    tensor); any other has ``stored()`` None, and streaming writers execute :meth:`tiled` with
    :meth:`lookup`; :meth:`read` builds it in memory. Not thread-safe (one streamer, built on first read).
    """

    def __init__(self) -> None:
        super().__init__()
        self._tiled: dict[str, TiledTensor] = {}
        self._streamer: TileStreamer | None = None

    def lookup(self, ref: Hashable) -> tuple[FileTensorSource, StoredTensor]:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return list(self._tiled)

    def __contains__(self, name: str) -> bool:
        return name in self._tiled

    def __len__(self) -> int:
        return len(self._tiled)

    def __iter__(self):
        return iter(self._tiled)

    def info(self, name: str) -> TensorInfo:
        return self._tiled[name].info

    def infos(self) -> list[TensorInfo]:
        return [t.info for t in self._tiled.values()]

    def tiled(self, name: str) -> TiledTensor:
        return self._tiled[name]

    def stored(self, name: str) -> StoredTensor | None:
        if name not in self._tensors:
            tiled = self._tiled[name]
            tiles = tiled.tiles
            if len(tiles) != 1 or tiles[0].src is None or (tiles[0].row, tiles[0].col, tiles[0].src_row, tiles[0].src_col) != (0, 0, 0, 0):
                return None
            entry = self.lookup(tiles[0].src)[1]
            if entry.info.shape != tiled.info.shape:
                return None
            self._tensors[name] = replace(entry, info=tiled.info)
        return self._tensors[name]

    def read(self, name: str):
        if self.stored(name) is not None:
            return super().read(name)
        if self._streamer is None:
            self._streamer = TileStreamer(self.lookup)
        return read_tiled(self._streamer, self._tiled[name])
