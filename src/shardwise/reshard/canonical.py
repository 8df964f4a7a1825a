"""A sharded model seen as its full (HuggingFace-named) tensors, merged lazily one tensor at a time.

``diff`` compares checkpoints across layouts through this view: a tensor stored whole in one
shard is read in place like any file tensor; one spread over shards (or fused, padded, reordered)
is assembled from its tiles when it is read, and only then.
"""

from __future__ import annotations

import os
from ..layout.stream import TiledSource
from .containers import Shards
from .model import ShardedModel, open_model

__all__ = ["CanonicalSource", "open_canonical", "open_layout_checkpoint"]


class CanonicalSource(TiledSource):
    """The canonical tensors of ``model`` (see module docstring). Closing it closes the model.

    ``model`` is a :class:`ShardedModel` or a CLIP ``ClipModel``: anything with ``inverse()``,
    ``lookup(ref)`` and ``close()``.
    """

    def __init__(self, model: ShardedModel) -> None:
        super().__init__()
        self.model = model
        self._tiled = {t.info.name: t for t in model.inverse()}

    def lookup(self, ref):
        return self.model.lookup(ref)

    def close(self) -> None:
        super().close()
        self.model.close()


class _View:
    def __init__(self, source: CanonicalSource) -> None:
        self.tensors = source

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.tensors.close()


def open_layout_checkpoint(path: str | os.PathLike, *, config: str | os.PathLike | None = None, trust_pickle: bool = False) -> "_View | None":
    """The canonical view of a sharded or Megatron-style checkpoint (see :func:`open_canonical`), or
    None for checkpoints that compare tensor by tensor as they are; the shards are found once."""
    from .clip_model import clip_source_kind, open_clip_model
    from .convert import layout_route

    kind = clip_source_kind(path)
    if kind in ("mcore", "openclip"):  # CLIP archives and OpenCLIP folders compare under HF names
        return _View(CanonicalSource(open_clip_model(path, trust_pickle=trust_pickle, kind=kind)))
    route = layout_route(path, "hf", {}, trust_pickle=trust_pickle)
    return None if route is None else open_canonical(route, config=config, trust_pickle=trust_pickle)


def open_canonical(path: str | os.PathLike | Shards, *, config: str | os.PathLike | None = None, trust_pickle: bool = False) -> _View:
    """A ``with``-able view whose ``tensors`` is the :class:`CanonicalSource` of ``path``."""
    return _View(CanonicalSource(open_model(path, config=config, trust_pickle=trust_pickle)))
