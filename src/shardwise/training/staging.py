"""Async staging: an async save that returns before its big copy, the optimizer's next step waiting for it.

A plain async save copies every tensor to CPU memory before it returns: one memory copy of the
whole state, bound by memory bandwidth (about 0.15 s per 1.7 GiB here, a device-to-host copy on a
GPU). Between two optimizer steps, though, only ``optimizer.step()`` changes the parameters and the
optimizer's states; the forward and backward passes read them and write gradients elsewhere. So
with staging the copy of exactly those tensors moves to the writer thread, overlapping the next
forward and backward, and a step pre-hook on the optimizer blocks its next ``step()`` until the
copy is done. Everything else (buffers such as batch-norm statistics, which the forward pass
updates, the scheduler, user content) is still copied before the save returns.

The contract the caller accepts: until the copy is done, nothing but that optimizer's ``step()``
changes its parameters or states in place. A save, a load and :func:`finalize_checkpoint` wait
for the whole save anyway.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import OptionError
from .assign import SnapshotBuffers, tensors_in

__all__ = ["DeferredCopies", "guarded_pointers"]


def guarded_pointers(optimizer: Any) -> set[int]:
    """Data pointers of what only ``optimizer.step()`` changes: its parameters and its states' tensors.

    State dicts hold detached views of the same memory (``Module.state_dict`` detaches), so tensors
    are matched by data pointer, not identity. Raises OptionError unless ``optimizer`` is a torch
    optimizer object: its step hook is what makes the deferred copy safe.
    """
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "register_step_pre_hook")):
        raise OptionError("async_staging needs the optimizer object itself (a torch.optim.Optimizer): its next step() is what waits for the copy")
    pointers = {p.data_ptr() for group in optimizer.param_groups for p in group["params"]}
    pointers |= {t.data_ptr() for t in tensors_in(list(optimizer.state.values()))}
    pointers.discard(0)  # empty tensors share the null pointer; copying them costs nothing
    return pointers


class DeferredCopies:
    """The copier :func:`.assign.snapshot` uses for a staged save: guarded tensors get a buffer now, their bytes later.

    :meth:`hold` installs the step pre-hook; :meth:`run` (writer thread) fills the deferred buffers
    and then opens the hook, also when the copy fails, so a step never waits forever. The hook is
    removed by :meth:`close`, on the caller's thread once the save is over: removing it from the
    writer thread could change torch's hook dict while ``step()`` iterates over it.
    """

    def __init__(self, buffers: SnapshotBuffers, guarded: set[int]) -> None:
        self._buffers = buffers
        self._guarded = guarded
        self._pending: list[tuple[Any, Any]] = []
        self._done = threading.Event()
        self._hook = None

    def copy(self, tensor):
        if tensor.data_ptr() not in self._guarded:
            return self._buffers.copy(tensor)
        out = self._buffers.take(tensor)
        self._pending.append((out, tensor.detach()))
        return out

    def hold(self, optimizer: Any) -> None:
        """Make ``optimizer.step()`` wait until :meth:`run` has copied the deferred tensors."""
        if self._pending:
            self._hook = optimizer.register_step_pre_hook(self._step_waits)
        else:
            self._done.set()

    def _step_waits(self, *_: Any) -> None:  # a step pre-hook must return None
        self._done.wait()

    def run(self) -> None:
        """Fill the deferred buffers (writer thread), then let the optimizer step."""
        try:
            for out, source in self._pending:
                out.copy_(source)
        finally:
            self._pending.clear()
            self._done.set()

    def close(self) -> None:
        """Remove the step hook (caller's thread, once the writer thread has ended)."""
        self._done.set()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
