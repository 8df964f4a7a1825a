"""Tiles: which rectangle of which source tensor fills which rectangle of an output tensor. Pure.

Every tensor is seen as a matrix: ``rows`` is its first dimension and ``cols`` the product of
the others (a vector of n elements is n x 1, a scalar 1 x 1). An output tensor is then described
completely by tiles that cover it exactly, each copying a same-sized rectangle of a source tensor,
or zeros (vocabulary padding). Splitting by rows or columns, fusing Q/K/V or gate/up, reordering
heads and replicating KV heads are all just tilings.

Because a tiling is data, everything else follows without per-layout code:

- :func:`invert` turns "how the shards are cut from the full tensors" into "how each full
  tensor is assembled from the shards" (replicas are read once; padding is dropped);
- :func:`compose` turns two layouts into a direct shard-to-shard plan, so resharding never
  builds a full tensor (:func:`read_through` is its step: tiles of a tiled source become tiles
  of that source's sources);
- :func:`coalesce` merges neighbouring tiles, so contiguous runs become single byte copies;
- :func:`unread_copies` names what :func:`invert` leaves unread (replicas, padding), so a
  checker can compare those bytes with the copy that is read, or with zeros.

Sources are opaque hashable references (a canonical tensor name, or ``(shard, name)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Iterable

from ..errors import LayoutError
from ..tensors import TensorInfo

__all__ = ["Tile", "TiledTensor", "matrix_shape", "whole", "invert", "compose", "read_through", "coalesce", "check_cover", "assemble", "unread_copies"]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor seen as a matrix: first dimension x the rest."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class Tile:
    """Output rows ``row:row+rows`` x cols ``col:col+cols`` come from ``src`` at (``src_row``, ``src_col``).

    ``src`` None means zeros.
    """

    row: int
    col: int
    rows: int
    cols: int
    src: Hashable | None
    src_row: int = 0
    src_col: int = 0


@dataclass(frozen=True)
class TiledTensor:
    """One output tensor and the tiles that fill it.

    ``grid`` (rows, cols) is the matrix the tiles address when it is not the tensor's own
    first-dimension-by-the-rest view: a stored tensor that is a reshape of its source with the same
    bytes (NeMo's CLIP class token is ``(1, 1, width)``, HF's ``(width,)``) is tiled as its source's
    matrix. Readers of such a stored tensor see it in that grid too (see ``PlannedModel.lookup``).
    """

    info: TensorInfo
    tiles: tuple[Tile, ...]
    grid: tuple[int, int] | None = None

    @property
    def matrix(self) -> tuple[int, int]:
        return self.grid or matrix_shape(self.info.shape)

    def sources(self) -> set:
        return {t.src for t in self.tiles if t.src is not None}


def whole(info: TensorInfo, src: Hashable) -> TiledTensor:
    """``info`` copied entirely from ``src`` (a tensor of the same shape)."""
    rows, cols = matrix_shape(info.shape)
    return TiledTensor(info, (Tile(0, 0, rows, cols, src),) if rows * cols else ())


def check_cover(label: str, rows: int, cols: int, tiles: Iterable[Tile]) -> None:
    """Raise LayoutError unless ``tiles`` cover a rows x cols matrix exactly once."""
    tiles = sorted(tiles, key=lambda t: (t.row, t.col))
    area = 0
    for t in tiles:
        if t.rows <= 0 or t.cols <= 0 or t.row < 0 or t.col < 0 or t.row + t.rows > rows or t.col + t.cols > cols:
            raise LayoutError(f"{label}: tile rows {t.row}+{t.rows}, cols {t.col}+{t.cols} lies outside its {rows} x {cols} tensor")
        area += t.rows * t.cols
    for i, a in enumerate(tiles):
        for b in tiles[i + 1:]:
            if b.row >= a.row + a.rows:
                break
            if b.col < a.col + a.cols and a.col < b.col + b.cols:
                raise LayoutError(f"{label}: two tiles overlap at rows {b.row}, cols {max(a.col, b.col)}")
    if area != rows * cols:
        raise LayoutError(f"{label}: tiles cover {area} of its {rows * cols} elements")


def invert(shards: dict[Hashable, list[TiledTensor]], canonical: dict[str, TensorInfo]) -> list[TiledTensor]:
    """How each canonical tensor is rebuilt from the shards that were cut from it.

    ``shards`` maps a shard key to its tensors, whose tiles name canonical tensors as sources.
    The result has one :class:`TiledTensor` per canonical tensor (in ``canonical``'s order) whose
    tiles name ``(shard, stored name)``. A rectangle stored several times (replicated norms, KV
    heads repeated for kv_size_multiplier, a tied copy of the embedding) is read from its first
    copy; zero padding is dropped. LayoutError when a canonical tensor is not covered exactly.
    """
    found: dict[str, dict[tuple[int, int, int, int], Tile]] = {name: {} for name in canonical}
    for shard, tensors in shards.items():
        for tensor in tensors:
            for t in tensor.tiles:
                if t.src is None:
                    continue
                if t.src not in found:
                    raise LayoutError(f"{tensor.info.name}: is cut from {t.src!r}, which the model does not have")
                key = (t.src_row, t.src_col, t.rows, t.cols)
                found[t.src].setdefault(key, Tile(t.src_row, t.src_col, t.rows, t.cols, (shard, tensor.info.name), t.row, t.col))
    out = []
    for name, info in canonical.items():
        tiles = _exact_cover(name, info, list(found[name].values()))
        out.append(TiledTensor(info, tuple(coalesce(tiles))))
    return out


def _exact_cover(name: str, info: TensorInfo, tiles: list[Tile]) -> list[Tile]:
    """Drop tiles contained in earlier ones (replicas cut differently), then check the cover."""
    rows, cols = matrix_shape(info.shape)
    kept: list[Tile] = []
    for t in tiles:
        if any(k.row <= t.row and k.col <= t.col and t.row + t.rows <= k.row + k.rows and t.col + t.cols <= k.col + k.cols for k in kept):
            continue
        kept.append(t)
    if rows * cols:
        check_cover(f"tensor {name}", rows, cols, kept)
    return kept


def compose(target: dict[Hashable, list[TiledTensor]], inverse: list[TiledTensor]) -> dict[Hashable, list[TiledTensor]]:
    """Rewrite ``target`` (tiles naming canonical tensors) to read the source shards directly.

    ``inverse`` is :func:`invert` of the source layout. Each target tile is cut along the
    source tiles it overlaps, so the result copies source-shard rectangles into target-shard
    rectangles with no full tensor in between.
    """
    by_name = {t.info.name: t.tiles for t in inverse}
    return {shard: [read_through(tensor, by_name.__getitem__) for tensor in tensors] for shard, tensors in target.items()}


def unread_copies(shards: dict[Hashable, list[TiledTensor]], inverse: list[TiledTensor]) -> dict[Hashable, list[TiledTensor]]:
    """The stored rectangles that reading through ``inverse`` never touches, per shard. Pure.

    ``shards`` is a layout's plan (tiles naming canonical tensors), ``inverse`` its :func:`invert`
    (tiles naming ``(shard, stored name)``). Each stored tensor holding such rectangles is listed
    with only those tiles: a replica's tile names the copy that is read in its place, a padding
    tile has ``src`` None (zeros). A stored tensor that is itself the copy read is not listed.

    >>> unread_copies({1: [norm_on_rank_1]}, invert(plan, canonical))  # doctest: +SKIP
    {1: [TiledTensor(norm_on_rank_1.info, (Tile(0, 0, 64, 1, (0, "norm"), 0, 0),))]}
    """
    composed = compose(shards, inverse)
    out: dict[Hashable, list[TiledTensor]] = {}
    for shard, tensors in composed.items():
        for tensor in tensors:
            itself = (shard, tensor.info.name)
            unread = tuple(t for t in tensor.tiles if (t.src, t.src_row, t.src_col) != (itself, t.row, t.col))
            if unread:
                out.setdefault(shard, []).append(replace(tensor, tiles=unread))
    return out


def read_through(tensor: TiledTensor, tiles_of: Callable[[Hashable], "tuple[Tile, ...] | None"]) -> TiledTensor:
    """``tensor`` with every tile whose source is itself tiled (``tiles_of(src)`` is not None) cut
    along that source's tiles, so that it names their sources instead. Zero tiles and tiles of
    sources ``tiles_of`` gives None for are kept as they are.

    >>> read_through(layer, {"stacked": chunk_tiles}.get)  # doctest: +SKIP
    """
    tiles: list[Tile] = []
    for t in tensor.tiles:
        inner = None if t.src is None else tiles_of(t.src)
        if inner is None:
            tiles.append(t)
            continue
        for s in inner:
            r0, r1 = max(t.src_row, s.row), min(t.src_row + t.rows, s.row + s.rows)
            c0, c1 = max(t.src_col, s.col), min(t.src_col + t.cols, s.col + s.cols)
            if r0 < r1 and c0 < c1:
                tiles.append(Tile(
                    t.row + r0 - t.src_row, t.col + c0 - t.src_col, r1 - r0, c1 - c0,
                    s.src, s.src_row + r0 - s.row, s.src_col + c0 - s.col,
                ))
    return TiledTensor(tensor.info, tuple(coalesce(tiles)), tensor.grid)


def coalesce(tiles: Iterable[Tile]) -> list[Tile]:
    """Merge tiles that continue each other in both output and source (across columns, then rows).

    The result is sorted by output position (row-major), the order the executor writes in.
    """
    merged = _merge(sorted(tiles, key=lambda t: (t.row, t.col)), across="cols")
    merged = _merge(sorted(merged, key=lambda t: (t.col, t.row)), across="rows")
    return sorted(merged, key=lambda t: (t.row, t.col))


def _merge(tiles: list[Tile], across: str) -> list[Tile]:
    out: list[Tile] = []
    for t in tiles:
        if out and _continues(out[-1], t, across):
            last = out[-1]
            out[-1] = replace(last, cols=last.cols + t.cols) if across == "cols" else replace(last, rows=last.rows + t.rows)
        else:
            out.append(t)
    return out


def _continues(a: Tile, b: Tile, across: str) -> bool:
    if a.src != b.src:
        return False
    if across == "cols":
        same = a.row == b.row and a.rows == b.rows and (a.src is None or a.src_row == b.src_row)
        return same and b.col == a.col + a.cols and (a.src is None or b.src_col == a.src_col + a.cols)
    same = a.col == b.col and a.cols == b.cols and (a.src is None or a.src_col == b.src_col)
    return same and b.row == a.row + a.rows and (a.src is None or b.src_row == a.src_row + a.rows)


def assemble(tensor: TiledTensor, fetch: Callable[[Hashable], "object"]):
    """Build ``tensor`` in memory from its tiles; ``fetch(src)`` returns the source torch tensor.

    For tests and small models; the conversion engine streams the same tiles instead.
    """
    import torch

    from ..dtypes import dtype as dtype_row

    rows, cols = tensor.matrix
    out = torch.zeros((rows, cols), dtype=dtype_row(tensor.info.dtype).torch())
    for t in tensor.tiles:
        if t.src is None:
            continue
        src = fetch(t.src)
        src = src.reshape(matrix_shape(tuple(src.shape)))
        out[t.row:t.row + t.rows, t.col:t.col + t.cols] = src[t.src_row:t.src_row + t.rows, t.src_col:t.src_col + t.cols]
    return out.reshape(tensor.info.shape)
