"""What every opened model in a parallel layout shares: its stored tensors planned as tiles of canonical ones.

A Llama-family :class:`~.model.ShardedModel` and a CLIP :class:`~.clip_model.ClipModel` both hold
``plan`` (shard -> stored tensors as tiles of the canonical tensors), ``canonical``, ``shards``
(shard -> open file source) and closers. :class:`PlannedModel` gives them the same inverse,
lookup and lifetime; :func:`plan_with_stored_dtypes` and :func:`check_shard` are the two steps
that relate a plan to what is on disk.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import Callable, Hashable

from ..errors import IntegrityError, LayoutError
from ..layout.stream import TiledSource, TileStreamer, read_tiled
from ..layout.tiles import Tile, TiledTensor, invert, read_through, unread_copies
from ..tensors import FileTensorSource, StoredTensor, TensorInfo
from ..units import CHUNK_BYTES

__all__ = ["PlannedModel", "plan_with_stored_dtypes", "check_shard"]

Plan = dict[Hashable, list[TiledTensor]]


class PlannedModel:
    """Methods for a dataclass with ``plan``, ``canonical``, ``shards``, ``files`` and ``_closers`` fields (and, when it
    has them, ``listed`` and ``zero_padding``). Close it to release files."""

    plan: Plan
    canonical: dict[str, TensorInfo]
    shards: dict[Hashable, FileTensorSource]
    files: dict[Hashable, str]  # shard -> how messages name its file
    _closers: list
    listed: "list | tuple" = ()  # the files its manifest lists, for their CRC-32s (.integrity.ListedFile); read-only here
    zero_padding = False  # whether the layout's padding rows are zeros (they are where shardwise wrote them)

    def inverse(self) -> list[TiledTensor]:
        """Each canonical tensor as tiles of ``(shard, stored name)``; where a shard's tensors are
        themselves tiled (a :class:`~shardwise.layout.stream.TiledSource`: DCP chunks, stacked
        layers), as tiles of ``(shard, that source's ref)``, so nothing is assembled in between."""
        inverse = invert(self.plan, self.canonical)
        tiled = {shard for shard, source in self.shards.items() if isinstance(source, TiledSource)}
        if not tiled:
            return inverse

        def tiles_of(ref: tuple[Hashable, str]):
            shard, name = ref
            if shard not in tiled or ref in self._grids:  # tiles in another grid (a reshaped class token): read it as stored
                return None
            return tuple(replace(t, src=None if t.src is None else (shard, t.src)) for t in self.shards[shard].tiled(name).tiles)

        return [read_through(tensor, tiles_of) for tensor in inverse]

    @cached_property
    def _grids(self) -> dict[tuple[Hashable, str], tuple[int, int]]:
        """``(shard, stored name)`` -> the grid its tiles address, for stored tensors tiled as a reshape (a class token)."""
        return {(shard, t.info.name): t.grid for shard, tensors in self.plan.items() for t in tensors if t.grid}

    def lookup(self, ref: Hashable) -> tuple[FileTensorSource, StoredTensor]:
        """The open source and entry of a ref of :meth:`inverse` (or of ``(shard, stored name)``), seen in
        the grid its tiles address when that is not its stored shape (a reshaped class token)."""
        shard, name = ref
        source = self.shards[shard]
        if isinstance(source, TiledSource) and not isinstance(name, str):
            return source.lookup(name)
        entry = source.stored(name)
        grid = self._grids.get(ref)
        if grid is not None and tuple(entry.info.shape) != grid:
            entry = replace(entry, info=replace(entry.info, shape=grid))
        return source, entry

    def check_copies(self) -> int:
        """Read every stored byte that :meth:`inverse` does not (see :func:`~shardwise.layout.tiles.unread_copies`):
        each replica must hold the bytes of the copy read in its place and, when ``zero_padding``
        (the layout says padding is zeros: shardwise wrote it), each padding row must be zeros.

        IntegrityError naming the shard's file (``files[shard]``) and the tensor otherwise; returns
        the bytes checked. A checkpoint of tiled sources (DCP chunks of global tensors) holds no
        replicas: nothing is read. Memory: about two chunks of one tile at a time.
        """
        if any(isinstance(source, TiledSource) for source in self.shards.values()):
            return 0
        streamer, checked = TileStreamer(self.lookup), 0
        for shard, tensors in unread_copies(self.plan, invert(self.plan, self.canonical)).items():
            for tensor in tensors:
                for tile in tensor.tiles:
                    if tile.src is not None or self.zero_padding:
                        checked += _check_tile(streamer, (shard, tensor.info.name), tensor.info.dtype, tile, self.files)
        return checked

    def close(self) -> None:
        for source in self.shards.values():
            source.close()
        for closer in self._closers:
            closer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_tile(streamer, itself: tuple[Hashable, str], dtype: str, tile: Tile, files: dict[Hashable, str]) -> int:
    """Compare the rectangle ``tile`` covers in stored tensor ``itself`` with its source (zeros when None), a chunk of rows at a time."""
    import torch

    from ..dtypes import dtype as dtype_row

    step = max(1, CHUNK_BYTES // max(1, tile.cols * dtype_row(dtype).itemsize))
    for first in range(0, tile.rows, step):
        rows = min(step, tile.rows - first)
        info = TensorInfo(itself[1], (rows, tile.cols), dtype)
        stored = read_tiled(streamer, TiledTensor(info, (Tile(0, 0, rows, tile.cols, itself, tile.row + first, tile.col),)))
        expected = read_tiled(streamer, TiledTensor(info, (Tile(0, 0, rows, tile.cols, tile.src, tile.src_row + first, tile.src_col),)))
        if not torch.equal(stored.view(torch.uint8), expected.view(torch.uint8)):
            file, at = files[itself[0]], f"rows {tile.row + first}..{tile.row + first + rows - 1}"
            if tile.src is None:
                raise IntegrityError(f"{file}: {itself[1]} {at} are vocabulary padding, which is written as zeros, but they are not zeros (the file is damaged)")
            raise IntegrityError(
                f"{file}: {itself[1]} {at} are a copy of {tile.src[1]} in {files[tile.src[0]]}, but their bytes differ (the file is damaged)"
            )
    return tile.rows * tile.cols * dtype_row(dtype).itemsize


def plan_with_stored_dtypes(make_plan: Callable[[dict[str, TensorInfo]], Plan], canonical: dict[str, TensorInfo],
                            stored: dict[Hashable, dict[str, TensorInfo]]) -> tuple[dict[str, TensorInfo], Plan]:
    """``(canonical, make_plan(canonical))`` with each canonical tensor's dtype that of the stored tensors cut from it.

    ``canonical`` comes with placeholder dtypes (the plan's shapes do not depend on them); ``stored``
    maps each shard to its tensors as found on disk. A canonical tensor no stored one is cut from
    keeps its placeholder (the check that follows reports the missing tensor).
    """
    dtypes: dict[str, str] = {}
    for shard, tensors in make_plan(canonical).items():
        for tensor in tensors:
            actual = stored[shard].get(tensor.info.name)
            for src in tensor.sources():
                if actual is not None:
                    dtypes.setdefault(src, actual.dtype)
    canonical = {n: replace(i, dtype=dtypes.get(n, i.dtype)) for n, i in canonical.items()}
    return canonical, make_plan(canonical)


def check_shard(file: str, expected: list[TiledTensor], stored: dict[str, TensorInfo], *, model: str, hint: str, tolerate=frozenset()) -> None:
    """LayoutError unless shard ``file`` stores exactly the ``expected`` tensors at their shapes.

    Transformer Engine's ``._extra_state`` entries and names in ``tolerate`` may be there besides;
    ``model`` ("a Llama model in this layout") and ``hint`` (what to check) complete the messages.
    """
    names = set()
    for tensor in expected:
        names.add(tensor.info.name)
        actual = stored.get(tensor.info.name)
        if actual is None:
            raise LayoutError(f"{file}: has no tensor {tensor.info.name}, which this layout needs; the layout is not what the files and options suggest")
        if actual.shape != tensor.info.shape:
            raise LayoutError(f"{file}: {tensor.info.name} has shape {list(actual.shape)}, the layout predicts {list(tensor.info.shape)} ({hint})")
    extra = [n for n in stored if n not in names and n not in tolerate and not n.endswith("._extra_state")]
    if extra:
        raise LayoutError(f"{file}: holds {len(extra)} tensor(s) {model} does not have, e.g. {extra[0]}")
