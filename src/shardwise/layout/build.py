"""Building one stored tensor from pieces of canonical tensors: the cuts every model's shard plan uses. Pure.

A model's plan (:mod:`.sharding` for the Llama family, :mod:`.clip_sharding` for CLIP) decides
which rows or columns of which canonical tensor a rank stores; these functions turn that decision
into a :class:`~.tiles.TiledTensor`:

- :func:`stacked_rows`: row ranges of canonical tensors (or zero rows) stacked top to bottom, the
  form of column-parallel weights, fused Q/K/V and gate/up, and vocabulary slices;
- :func:`side_by_side`: column ranges of one canonical tensor placed left to right, the form of
  row-parallel weights;
- :func:`vocab_pieces`: the rows of a vocabulary-parallel embedding that one rank holds, padded
  with zero rows past the real vocabulary (Megatron's ``_vocab_size_with_padding``);
- :func:`replicated`: a canonical tensor stored whole under another name (norms, biases kept on every rank).
"""

from __future__ import annotations

import math

from ..errors import LayoutError
from ..tensors import TensorInfo
from .tiles import Tile, TiledTensor, coalesce, matrix_shape, whole

__all__ = ["Piece", "stacked_rows", "side_by_side", "vocab_pieces", "replicated", "one_dtype"]

Piece = tuple[TensorInfo | None, int, int]  # (canonical tensor or None for zeros, first row, row count)


def one_dtype(name: str, infos: list[TensorInfo | None], default: str | None = None) -> str:
    """The single dtype of the tensors fused into ``name``; LayoutError when they differ."""
    dtypes = {i.dtype for i in infos if i is not None} or {default}
    if len(dtypes) != 1:
        raise LayoutError(f"{name}: would fuse tensors of different dtypes ({', '.join(sorted(map(str, dtypes)))}); convert them to one dtype first (--dtype)")
    return dtypes.pop()


def stacked_rows(name: str, pieces: list[Piece], cols: int, dtype: str | None = None, *, shape: tuple[int, ...] | None = None) -> TiledTensor:
    """``pieces`` stacked into one tensor of ``cols`` columns, stored with ``shape`` (default: rows x cols).

    When ``shape``'s own matrix view (first dimension x the rest) is not rows x cols (a bias
    ``(rows,)`` is, NeMo's class token ``(1, 1, width)`` tiled from a ``(width,)`` vector is not),
    the tiles address the tensor as the rows x cols grid.

    >>> q = TensorInfo("q", (8, 4), "float32")
    >>> stacked_rows("qkv", [(q, 0, 2), (q, 4, 2)], 4).info.shape
    (4, 4)
    """
    tiles, row = [], 0
    dtype = one_dtype(name, [p[0] for p in pieces], dtype)
    for info, first, count in pieces:
        tiles.append(Tile(row, 0, count, cols, info.name, first, 0) if info else Tile(row, 0, count, cols, None))
        row += count
    shape = tuple(shape) if shape is not None else (row, cols)
    if math.prod(shape) != row * cols:
        raise LayoutError(f"{name}: {row} x {cols} elements cannot be stored with shape {list(shape)}")
    grid = None if matrix_shape(shape) == (row, cols) else (row, cols)
    return TiledTensor(TensorInfo(name, shape, dtype), tuple(coalesce(tiles)), grid)


def side_by_side(name: str, info: TensorInfo, pieces: list[tuple[int, int]]) -> TiledTensor:
    """Column ranges (first column, count) of ``info`` placed left to right in one tensor."""
    tiles, col = [], 0
    for first, count in pieces:
        tiles.append(Tile(0, col, info.shape[0], count, info.name, 0, first))
        col += count
    return TiledTensor(TensorInfo(name, (info.shape[0], col), info.dtype), tuple(coalesce(tiles)))


def replicated(name: str, info: TensorInfo) -> TiledTensor:
    """All of ``info``, stored as the tensor ``name``."""
    return whole(TensorInfo(name, info.shape, info.dtype), info.name)


def vocab_pieces(info: TensorInfo, vocab: int, padded: int, tp: int, tp_rank: int) -> list[Piece]:
    """The rows of ``info`` (a vocabulary of ``vocab`` rows padded to ``padded``) that TP rank ``tp_rank`` stores.

    Each rank holds ``padded // tp`` consecutive rows; rows past ``vocab`` are zeros.

    >>> embed = TensorInfo("embed", (10, 4), "float32")
    >>> vocab_pieces(embed, 10, 12, 2, 1)
    [(TensorInfo(name='embed', shape=(10, 4), dtype='float32'), 6, 4), (None, 10, 2)]
    """
    per_rank = padded // tp
    start, stop = tp_rank * per_rank, (tp_rank + 1) * per_rank
    pieces: list[Piece] = []
    if start < vocab:
        pieces.append((info, start, min(stop, vocab) - start))
    if stop > vocab:
        pieces.append((None, max(start, vocab), stop - max(start, vocab)))
    return pieces
