"""Who writes which file of a training checkpoint, and the CPU snapshot an async save writes from.

Each rank calls :func:`files_to_write` with its own coordinates and states; the answer depends
only on the coordinates and on byte counts, which every DP replica computes alike, so the ranks
agree without talking:

- model states are replicated over DP: each (tp, pp) model file is written once, by one rank of
  its DP group;
- a replicated (non-ZeRO) optimizer state likewise; the replicated files of a DP group are spread
  over its ranks, largest first onto the least loaded rank, so DP=2 with Adam has one rank write
  the model and the other the optimizer;
- ZeRO-1 optimizer states are different on every rank: every rank writes its own ``dp_rank_DD``;
- scheduler and user content exist once: the first rank (tp = pp = dp = 0) writes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..distributed import ParallelCoords
from .layout import SCHEDULER, USER_CONTENT, model_file, optim_file

__all__ = ["FileWrite", "files_to_write", "state_bytes", "snapshot", "SnapshotBuffers"]


@dataclass
class FileWrite:
    """One file this rank writes: its path inside the tag and the object stored in it."""

    name: str
    obj: Any
    nbytes: int


def _tensors(obj: Any):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def state_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) state: what deciding who writes it weighs."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _spread(replicated: list[FileWrite], dp_size: int) -> list[int]:
    """The DP rank writing each replicated file: largest first, each onto the least loaded rank
    (ties to the lower rank; the result is the same on every replica)."""
    load = [0] * dp_size
    owner = [0] * len(replicated)
    for i in sorted(range(len(replicated)), key=lambda i: (-replicated[i].nbytes, i)):
        rank = min(range(dp_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += replicated[i].nbytes
    return owner


def files_to_write(
    coords: ParallelCoords, *, model: Any = None, optimizer: Any = None, scheduler: Any = None,
    user_content: Any = None, zero1: bool = False,
) -> list[FileWrite]:
    """The files this rank writes, given plain state objects (None: not saved)."""
    t, p = coords.tp_rank, coords.pp_rank
    replicated = []
    if model is not None:
        replicated.append(FileWrite(model_file(t, p), model, state_bytes(model)))
    if optimizer is not None and not zero1:
        replicated.append(FileWrite(optim_file(0, t, p), optimizer, state_bytes(optimizer)))
    mine = [w for w, owner in zip(replicated, _spread(replicated, coords.dp_size)) if owner == coords.dp_rank]
    if optimizer is not None and zero1:
        mine.append(FileWrite(optim_file(coords.dp_rank, t, p), optimizer, state_bytes(optimizer)))
    if coords.is_first_model_rank:
        for name, obj in ((SCHEDULER, scheduler), (USER_CONTENT, user_content)):
            if obj is not None:
                mine.append(FileWrite(name, obj, state_bytes(obj)))
    return mine


class SnapshotBuffers:
    """CPU copies of the tensors an async save writes, reused by the next save when shapes match.

    Copying into memory that was already touched avoids a page fault per 4 KiB, which is most of
    the cost of a fresh copy; the buffers are handed back with :meth:`release` once written.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list] = {}

    def copy(self, tensor):
        import torch

        key = (tuple(tensor.shape), tensor.dtype)
        pool = self._free.get(key)
        out = pool.pop() if pool else torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
        out.copy_(tensor.detach())
        return out

    def release(self, obj: Any) -> None:
        for tensor in _tensors(obj):
            self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


def snapshot(obj: Any, buffers: SnapshotBuffers) -> Any:
    """A deep copy of ``obj`` whose tensors are CPU copies (containers rebuilt, other leaves shared:
    numbers and strings are immutable; user objects are the caller's not to mutate mid-save)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return buffers.copy(obj)
    if isinstance(obj, dict):
        copied = {k: snapshot(v, buffers) for k, v in obj.items()}
        if type(obj) is dict:
            return copied
        clone = copy.copy(obj)  # OrderedDict and other dict subclasses keep their type and attributes (_metadata)
        clone.clear()
        clone.update(copied)
        return clone
    if isinstance(obj, list):
        return [snapshot(v, buffers) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, buffers) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj
