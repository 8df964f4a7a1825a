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

from ..errors import LayoutError
from ..layout.stream import TiledSource
from ..layout.tiles import TiledTensor, invert, read_through
from ..tensors import FileTensorSource, StoredTensor, TensorInfo

__all__ = ["PlannedModel", "plan_with_stored_dtypes", "check_shard"]

Plan = dict[Hashable, list[TiledTensor]]


class PlannedModel:
    """Methods for a dataclass with ``plan``, ``canonical``, ``shards`` and ``_closers`` fields. Close it to release files."""

    plan: Plan
    canonical: dict[str, TensorInfo]
    shards: dict[Hashable, FileTensorSource]
    _closers: list

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

    def close(self) -> None:
        for source in self.shards.values():
            source.close()
        for closer in self._closers:
            closer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
