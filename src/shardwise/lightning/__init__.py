"""PyTorch Lightning checkpoints saved through shardwise: ``Trainer(plugins=[ShardwiseCheckpointIO()])``.

- :class:`ShardwiseCheckpointIO`: each checkpoint becomes a folder at the path Lightning names
  (safetensors payload, manifest with CRC-32s, written atomically); ``trainer.fit(ckpt_path=...)``
  resumes from such a folder, from a single-file ``.ckpt`` written by Lightning's own plugin, or
  from a PyTorch distributed checkpoint folder (Lightning's sharded checkpoints included).
- :class:`AsyncShardwiseCheckpointIO`: the same, written on a background thread.

Modules: :mod:`.plugin` (the two classes), :mod:`.paths` (what a path is, load/remove by kind),
:mod:`.folder` (the on-disk format), :mod:`.values` (safe forms of non-tensor values),
:mod:`.dcp_folder` (DCP folders as Lightning checkpoint dicts). Only
:mod:`.plugin` imports Lightning, when one of the classes is first asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShardwiseCheckpointIO", "AsyncShardwiseCheckpointIO"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
