"""Who writes which file of a training checkpoint, and the CPU snapshot an async save writes from.

Each rank calls :func:`files_to_write` with its own coordinates and states; the answer depends
only on the coordinates and on byte counts, which every DP replica computes alike, so the ranks
agree without talking:

- model states are replicated over DP: each (tp, pp) model file is written once, by one rank of
  its DP group;
- a replicated (non-ZeRO) optimizer state likewise; with ``pt`` the replicated files of a DP
  group are spread over its ranks, largest first onto the least loaded rank, so DP=2 with Adam has
  one rank write the model and the other the optimizer; with safetensors and xser every DP rank
  writes a share of each replicated file, tensor by tensor (:mod:`.encodings`);
- ZeRO-1 optimizer states are different on every rank: every rank writes its own ``dp_rank_DD``;
- scheduler and user content exist once: the first rank (tp = pp = dp = 0) writes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

from ..distributed import ParallelCoords
from .layout import SCHEDULER, USER_CONTENT, model_file, optim_file

__all__ = ["FileWrite", "files_to_write", "state_bytes", "snapshot", "replace_tensors", "SnapshotBuffers", "spread", "tensors_in", "tensor_uses"]


@dataclass
class FileWrite:
    """One state this rank writes (all of it, or part ``part`` of ``parts``): its name in the tag and the object."""

    name: str
    obj: Any
    nbytes: int
    part: int = 0
    parts: int = 1


def tensor_uses(obj: Any):
    """Every tensor of a (nested) state, once per place it is found (dict values, list and tuple items)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensor_uses(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensor_uses(value)


def tensors_in(obj: Any) -> list:
    """The tensors of a (nested) state in traversal order (dict order, then list order), each once."""
    seen: dict[int, Any] = {}
    for tensor in tensor_uses(obj):
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def state_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) state: what deciding who writes it weighs."""
    return sum(t.numel() * t.element_size() for t in tensors_in(obj))


def spread(sizes: list[int], bins: int) -> list[int]:
    """The bin of each item: largest first, each onto the least loaded bin (ties to the lower bin),
    so every replica computing it from the same sizes gets the same answer."""
    load = [0] * bins
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(bins), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


def files_to_write(
    coords: ParallelCoords, *, model: Any = None, optimizer: Any = None, scheduler: Any = None,
    user_content: Any = None, zero1: bool = False, split_by_tensor: bool = False,
) -> list[FileWrite]:
    """The states this rank writes, given plain state objects (None: not saved).

    ``split_by_tensor`` (safetensors and xser): every DP rank writes part of each replicated state,
    tensor by tensor; otherwise each replicated state goes whole to one DP rank.
    """
    t, p = coords.tp_rank, coords.pp_rank
    replicated = []
    if model is not None:
        replicated.append(FileWrite(model_file(t, p), model, state_bytes(model)))
    if optimizer is not None and not zero1:
        replicated.append(FileWrite(optim_file(0, t, p), optimizer, state_bytes(optimizer)))
    if split_by_tensor:
        mine = [FileWrite(w.name, w.obj, w.nbytes, coords.dp_rank, coords.dp_size) for w in replicated]
    else:
        owners = spread([w.nbytes for w in replicated], coords.dp_size)
        mine = [w for w, owner in zip(replicated, owners) if owner == coords.dp_rank]
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

    def take(self, tensor):
        """A CPU buffer of ``tensor``'s shape and dtype (a released one when there is one), not yet filled."""
        import torch

        pool = self._free.get((tuple(tensor.shape), tensor.dtype))
        return pool.pop() if pool else torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")

    def copy(self, tensor):
        out = self.take(tensor)
        out.copy_(tensor.detach())
        return out

    def release(self, obj: Any) -> None:
        for tensor in tensors_in(obj):
            if tensor.device.type == "cpu":
                self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


def replace_tensors(obj: Any, replace: Callable[[Any], Any], memo: dict | None = None) -> Any:
    """A copy of ``obj`` with ``replace(tensor)`` in place of each tensor: containers rebuilt with
    their types (dict subclasses keep their attributes, as an OrderedDict state dict its
    ``_metadata``; named tuples stay named), other leaves shared. A tensor that appears twice is
    replaced once (``memo``: id -> replacement), so the copy has the same tensor in the same places.
    """
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = replace(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        copied = {k: replace_tensors(v, replace, memo) for k, v in obj.items()}
        if type(obj) is dict:
            return copied
        clone = copy.copy(obj)  # OrderedDict and other dict subclasses keep their type and attributes (_metadata)
        clone.clear()
        clone.update(copied)
        return clone
    if isinstance(obj, list):
        return [replace_tensors(v, replace, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [replace_tensors(v, replace, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def snapshot(obj: Any, buffers: SnapshotBuffers, keep: set[int] | None = None) -> Any:
    """A deep copy of ``obj`` whose tensors are CPU copies (containers rebuilt, other leaves shared:
    numbers and strings are immutable; user objects are the caller's not to mutate mid-save).

    With ``keep`` (ids of tensors), the other tensors become ``meta`` tensors of the same shape
    and dtype: what a rank writing only part of a state needs of the rest. A tensor that appears
    twice is copied once, so the copy has the original's tensors in the same places.
    """
    import torch

    def copy_or_placeholder(tensor):
        if keep is None or id(tensor) in keep:
            return buffers.copy(tensor)
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    return replace_tensors(obj, copy_or_placeholder)
