"""What a checkpoint path is, and what loading, removing and replacing it mean for each kind.

Lightning hands the plugin one path per checkpoint. :func:`kind_of` tells what is there, from the
file system and a file's first bytes, never from the name:

- ``SHARDWISE``: a folder holding ``shardwise.json`` (:mod:`.folder`);
- ``DCP``: a folder holding ``.metadata``, a ``torch.distributed.checkpoint`` save (Lightning's
  sharded checkpoints, with their ``meta.pt``, or ``dcp.save`` of a checkpoint dict: :mod:`.dcp_folder`);
- ``TORCH``: a file that starts as a torch file (zip archive or legacy pickle), such as the
  ``.ckpt`` Lightning's default ``TorchCheckpointIO`` writes;
- ``MISSING``, ``OTHER``: nothing there, or something shardwise does not read.

:func:`load` dispatches on that kind, one branch per kind; each returns the checkpoint dict.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import discard_stage, fsync_dir, staging_name
from ..errors import FormatError, OutputExistsError
from ..formats.dcp import METADATA as DCP_METADATA, looks_like_dcp
from ..formats.torch_pickle import looks_like_torch
from ..training.files import torch_load
from ..training.layout import MANIFEST
from .dcp_folder import read_dcp_checkpoint
from .folder import is_lightning_folder, is_shardwise_folder, read_folder
from .values import inert_classes

__all__ = ["SHARDWISE", "DCP", "TORCH", "MISSING", "OTHER", "kind_of", "load", "remove", "check_replaceable"]

SHARDWISE, DCP, TORCH, MISSING, OTHER = "shardwise", "dcp", "torch", "missing", "other"
NOT_A_CHECKPOINT = "a folder that is not a checkpoint (neither a Lightning checkpoint shardwise wrote nor a DCP folder)"


def kind_of(path: Path) -> str:
    """The kind of checkpoint at ``path`` (symbolic links followed)."""
    if path.is_dir():
        if is_shardwise_folder(path):
            return SHARDWISE
        return DCP if looks_like_dcp(path) else OTHER
    if path.is_file():
        with open(path, "rb") as f:
            return TORCH if looks_like_torch(f.read(16)) else OTHER
    return MISSING


def load(path: Path, *, trust_pickle: bool, verify: bool) -> dict:
    """The checkpoint dict at ``path``, tensors on CPU, whatever kind of checkpoint it is.

    A shardwise folder is checked against its manifest (IntegrityError naming a damaged file); a
    torch file is read with ``weights_only`` plus a few inert classes Lightning checkpoints carry
    (argparse Namespace, paths, AttributeDict); anything else pickled needs ``trust_pickle``
    (UnsafeCheckpointError naming the file). A DCP folder's tensors are merged whole from the
    chunks of all ranks, its pickled parts read as a torch file's are (``verify`` does not apply:
    DCP records no checksums). FormatError naming ``path`` (or the damaged file) for what is not
    a checkpoint shardwise reads.
    """
    kind = kind_of(path)
    if kind == SHARDWISE:
        return read_folder(path, trust_pickle=trust_pickle, verify=verify)
    if kind == TORCH:
        checkpoint = torch_load(path, trust_pickle, allowed=inert_classes())
        if not isinstance(checkpoint, dict):
            raise FormatError(f"{path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
        return checkpoint
    if kind == DCP:
        return read_dcp_checkpoint(path, trust_pickle=trust_pickle)
    if kind == MISSING:
        raise FormatError(f"{path}: no such checkpoint (nothing at this path)")
    if path.is_dir():
        what = f"a folder without {MANIFEST} or {DCP_METADATA}"
    else:
        what = "a file that does not start as a torch file" if path.stat().st_size else "an empty file"
    raise FormatError(f"{path}: not a checkpoint shardwise reads ({what}); expected a shardwise checkpoint folder, a DCP folder or a torch .ckpt file")


def check_replaceable(path: Path) -> None:
    """OutputExistsError unless a save may replace what is at ``path``: nothing, a file or link (as
    Lightning's own plugin overwrites them), an empty folder or a checkpoint folder. Any other
    folder is kept: deleting it could lose data a wrong path pointed at."""
    if path.is_symlink() or not path.is_dir() or _is_checkpoint_folder(path) or not any(path.iterdir()):
        return
    raise OutputExistsError(f"{path}: {NOT_A_CHECKPOINT}; not replaced by a checkpoint")


def _is_checkpoint_folder(path: Path) -> bool:
    """A folder a save may replace and removal may delete: a Lightning checkpoint shardwise wrote, or a DCP folder."""
    kind = kind_of(path)
    return kind == DCP or kind == SHARDWISE and is_lightning_folder(path)


def remove(path: Path) -> None:
    """Remove the checkpoint at ``path``; nothing there is fine. A link is removed, not its target.

    A checkpoint folder is first renamed to a hidden staging name (atomic: the path never shows a
    half-removed checkpoint), then deleted; a crash in between leaves only that hidden folder, which
    the next save in the same folder clears. FormatError, nothing removed, for any other folder.
    """
    if path.is_symlink() or path.is_file():
        path.unlink()
        fsync_dir(path.parent)
        return
    if not path.exists():
        return
    if not _is_checkpoint_folder(path):
        raise FormatError(f"{path}: not removed: {NOT_A_CHECKPOINT}")
    hidden = staging_name(path)
    os.rename(path, hidden)
    fsync_dir(path.parent)
    discard_stage(hidden)
