"""What ``inspect`` reports about a checkpoint, as plain data (the CLI renders it as a table or JSON).

Built from headers only: no tensor data is read, and for safetensors torch is not even imported.
"""

from __future__ import annotations

import os
from collections import Counter

from .formats import Checkpoint, open_checkpoint

__all__ = ["describe", "inspect_path"]


def describe(ckpt: Checkpoint) -> dict:
    """The ``inspect --json`` object: format, counts, dtypes, tensors, config, layout and extras."""
    infos = ckpt.infos()
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "weights_format": ckpt.weights_format,
        "files": ckpt.files,
        "num_tensors": len(infos),
        "num_params": sum(i.numel for i in infos),
        "total_bytes": sum(i.nbytes for i in infos),
        "dtypes": dict(sorted(Counter(i.dtype for i in infos).items())),
        "tensors": [i.as_dict() for i in infos],
        "config": ckpt.config,
        "layout": ckpt.layout,
        "metadata": ckpt.metadata or None,
        "companion_files": ckpt.companion_files,
        "tokenizer_files": ckpt.tokenizer_files,
        "training_state": ckpt.training_state or None,
        "archive": _archive_summary(ckpt.archive) if ckpt.archive is not None else None,
    }


def _archive_summary(archive) -> dict:
    return {
        "compressed": archive.index.compressed,
        "layout": archive.layout.as_dict(),
        "members": archive.members(),
        "artifacts": archive.artifacts(),
        "manifest": None if archive.manifest is None else {k: archive.manifest.get(k) for k in ("format", "version", "created_by")},
    }


def inspect_path(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """Open ``path`` lazily and describe it (see :func:`describe`)."""
    with open_checkpoint(path, trust_pickle=trust_pickle) as ckpt:
        return describe(ckpt)
