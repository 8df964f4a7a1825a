"""Another file source's tensors under new names, each possibly a view of a stored one. No data is read.

A view is described by where its elements are, like any :class:`~shardwise.tensors.StoredTensor`:
the same file, an offset and element strides. So a view is read (and streamed, and compared) by
the ordinary file-source code, without a copy and without this module knowing any format:

- ``("rows", k, n)``: the k-th of n equal row blocks (OpenCLIP's ``in_proj_weight`` = [Q; K; V]);
- ``"T"``: the transpose of a 2-D tensor (strides swapped; read whole when used).
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import FormatError
from ..tensors import FileTensorSource, StoredTensor, TensorInfo, contiguous_strides

__all__ = ["ViewSource", "view_of"]


def view_of(entry: StoredTensor, view, name: str) -> StoredTensor:
    """``entry`` seen through ``view`` (see module docstring) as the tensor ``name``; FormatError when it does not apply."""
    info = entry.info
    strides = entry.strides or contiguous_strides(info.shape)
    if view is None:
        return replace(entry, info=replace(info, name=name))
    if view == "T":
        if len(info.shape) != 2:
            raise FormatError(f"{entry.path}: tensor '{info.name}' has shape {list(info.shape)}; a transposed view needs 2 dimensions")
        return StoredTensor.make(TensorInfo(name, info.shape[::-1], info.dtype), entry.path, entry.offset, strides[::-1])
    if view[0] == "rows":
        _, k, n = view
        if not info.shape or info.shape[0] % n:
            raise FormatError(f"{entry.path}: tensor '{info.name}' of shape {list(info.shape)} does not split into {n} equal row blocks")
        rows = info.shape[0] // n
        offset = entry.offset + k * rows * strides[0] * info.itemsize
        return StoredTensor.make(TensorInfo(name, (rows, *info.shape[1:]), info.dtype), entry.path, offset, strides)
    raise ValueError(f"unknown view {view!r}")


class ViewSource(FileTensorSource):
    """Tensors named ``name -> (stored name in base, view)``, read from ``base``'s files in place.

    Takes over ``base`` (closing the view closes it). Not thread-safe, like every file source.

    >>> q = ViewSource(openclip_file, {"q": ("attn.in_proj_weight", ("rows", 0, 3))})  # doctest: +SKIP
    """

    def __init__(self, base: FileTensorSource, views: dict[str, tuple[str, object]]) -> None:
        super().__init__()
        self.base = base
        self.metadata = dict(getattr(base, "metadata", {}))
        for name, (stored, view) in views.items():
            entry = base.stored(stored)
            if entry is None:
                raise FormatError(f"tensor '{stored}' is not stored in a file; it cannot be viewed as '{name}'")
            self._tensors[name] = view_of(entry, view, name)

    def close(self) -> None:
        super().close()
        self.base.close()
