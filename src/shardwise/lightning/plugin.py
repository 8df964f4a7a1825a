"""Lightning ``CheckpointIO`` plugins that save through shardwise and resume from what it saved.

Lightning calls ``save_checkpoint`` and ``remove_checkpoint`` on global rank 0 only and
``load_checkpoint`` on every rank, with the path of one checkpoint each time: these plugins need
no collective. The classes derive from the ``CheckpointIO`` of every Lightning package that is
installed (``lightning`` and ``pytorch_lightning`` each have their own), so either ``Trainer``
accepts them.

>>> trainer = Trainer(plugins=[ShardwiseCheckpointIO()], callbacks=[ModelCheckpoint(dirpath="ckpts")])  # doctest: +SKIP
>>> trainer.fit(model, ckpt_path="ckpts/epoch=3-step=400.ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..storage.urls import file_url_path, url_text
from ..training import background
from ..training.api import finalize_checkpoint
from ..training.assign import SnapshotBuffers, replace_tensors
from .folder import snapshot_checkpoint, write_folder
from .paths import check_replaceable, load, remove

__all__ = ["ShardwiseCheckpointIO", "AsyncShardwiseCheckpointIO"]


def _checkpoint_io_bases() -> tuple[type, ...]:
    bases = []
    for module in ("lightning.fabric.plugins.io.checkpoint_io", "lightning_fabric.plugins.io.checkpoint_io"):
        try:
            bases.append(importlib.import_module(module).CheckpointIO)
        except ImportError:
            pass
    if not bases:
        raise ImportError("shardwise.lightning needs PyTorch Lightning: pip install lightning (or pytorch-lightning)")
    return tuple(bases)


def _where(path: Any) -> Path | str:
    """A checkpoint path as a local Path, or as a URL string (``s3://...``, see :mod:`.remote`)."""
    return url_text(path) or Path(file_url_path(path) or os.fspath(path))


def _identity(where: Path | str) -> str:
    """What makes two checkpoint locations the same: a URL as given, a path made absolute."""
    return where if isinstance(where, str) else os.path.abspath(where)


def _write(snapshot: Any, target: Path | str) -> None:
    if isinstance(target, str):
        from .remote import save_url

        save_url(snapshot, target)
    else:
        write_folder(snapshot, target)


def _relocate(checkpoint: dict, map_location: Any) -> dict:
    """Apply ``torch.load``'s ``map_location`` to a checkpoint loaded on CPU: a device or its name, a
    dict of location names (``{"cpu": "cuda:0"}``), or ``fn(storage, "cpu")`` returning a storage or None."""
    if map_location is None:
        return checkpoint
    import torch

    def place(tensor):
        if isinstance(map_location, dict):
            target = map_location.get("cpu")
            return tensor if target is None else tensor.to(target)
        if not callable(map_location):
            return tensor.to(map_location)
        moved = map_location(tensor.untyped_storage(), "cpu")
        if moved is None or moved is tensor.untyped_storage():
            return tensor
        return torch.empty(0, dtype=tensor.dtype, device=moved.device).set_(moved, tensor.storage_offset(), tensor.shape, tensor.stride())

    return replace_tensors(checkpoint, place)


class ShardwiseCheckpointIO(*_checkpoint_io_bases()):
    """Saves each Lightning checkpoint as a shardwise folder at the path Lightning names, and loads
    shardwise folders, single-file ``.ckpt`` files and PyTorch distributed checkpoint (DCP) folders alike.

    - ``save_checkpoint``: atomic (complete folder or the previous content), safetensors for every
      tensor, manifest with sizes and CRC-32s (:mod:`.folder`). Replaces a file, a link or a
      checkpoint folder at the path; any other non-empty folder is an OutputExistsError.
    - ``load_checkpoint``: the dict that was saved; files checked against the manifest
      (``verify=False``: sizes only). Values that had to be pickled, and torch files that pickle
      more than tensors, containers and a few inert classes, load only with ``trust_pickle=True``
      or Lightning's ``weights_only=False``; ``weights_only=True`` refuses them whatever
      ``trust_pickle`` says. Tensors load on CPU, then go where ``map_location`` says. A DCP folder
      (Lightning's sharded checkpoints with their ``meta.pt``, or ``dcp.save`` of a checkpoint dict)
      loads with every tensor merged whole from the chunks of all ranks (:mod:`.dcp_folder`).
    - ``remove_checkpoint``: removes a checkpoint folder (renamed away first, so the path never
      shows half of one), a file or a link; a missing path is fine.

    Paths may be ``s3://`` (any fsspec) URLs (see :mod:`.remote`), with credentials from the
    environment; ``storage_options`` are refused. Not thread-safe: Lightning
    calls one method at a time.
    """

    def __init__(self, *, trust_pickle: bool = False, verify: bool = True) -> None:
        super().__init__()
        self.trust_pickle = trust_pickle
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        _write(snapshot_checkpoint(checkpoint), self._target(path, storage_options))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        trust = self.trust_pickle if weights_only is None else not weights_only
        where = _where(path)
        if isinstance(where, str):
            from .remote import load_url

            return _relocate(load_url(where, trust_pickle=trust, verify=self.verify), map_location)
        return _relocate(load(where, trust_pickle=trust, verify=self.verify), map_location)

    def remove_checkpoint(self, path: Any) -> None:
        where = _where(path)
        if isinstance(where, str):
            from .remote import remove_url

            remove_url(where)
        else:
            remove(where)

    def _target(self, path: Any, storage_options: Any) -> Path | str:
        if storage_options is not None:
            raise OptionError(f"{path}: {type(self).__name__} takes no storage_options (got {storage_options!r}); credentials come from the environment")
        target = _where(path)
        if isinstance(target, str):
            from .remote import check_replaceable_url

            check_replaceable_url(target)
        else:
            check_replaceable(target)
        return target


class AsyncShardwiseCheckpointIO(ShardwiseCheckpointIO):
    """:class:`ShardwiseCheckpointIO` whose save returns once the tensors are copied to CPU memory
    (buffers reused from save to save) and the rest of the dict is encoded; a writer thread writes
    the folder.

    One save is in flight per process (shared with ``shardwise.save_checkpoint(async_save=True)``):
    the next save, a load, ``teardown()`` (which Lightning calls when fit, validate or test ends)
    and ``shardwise.finalize_checkpoint()`` wait for it and raise its error; at interpreter exit an
    error nobody collected is printed. Removing the path being written waits for it first. The
    structure and pickled values are taken before the save returns, tensors copied.
    """

    def __init__(self, *, trust_pickle: bool = False, verify: bool = True) -> None:
        super().__init__(trust_pickle=trust_pickle, verify=verify)
        self._buffers = SnapshotBuffers()
        self._writing: Path | str | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._wait()  # the previous save's error surfaces here
        target = self._target(path, storage_options)
        snap = snapshot_checkpoint(checkpoint, copy=self._buffers.copy)

        def write() -> None:
            try:
                _write(snap, target)
            finally:
                self._buffers.release(snap.tensors)

        self._writing = target
        background.submit(write)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        self._wait()
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        if self._writing is not None and _identity(self._writing) == _identity(_where(path)):
            self._wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """Wait for the save in flight; raise its error."""
        self._wait()

    def _wait(self) -> None:
        self._writing = None
        finalize_checkpoint()  # the shared writer thread; also drops an optimizer hook a staged training save left
