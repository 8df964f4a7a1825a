"""shardwise: move deep-learning checkpoints between formats and layouts, streaming, verified and safe.

The public API (everything else is implementation):

- :func:`open` a checkpoint lazily (any format) -> :class:`Checkpoint`
- :func:`convert` between formats, bit-exact unless a dtype is asked for
- :func:`diff` two checkpoints tensor by tensor -> :class:`DiffReport`
- :func:`inspect` a checkpoint -> plain dict (what ``shardwise inspect --json`` prints)
- :func:`clip_infer`: zero-shot probabilities of texts for an image from a CLIP archive -> :class:`ClipScores`
- :func:`hf_model_path`: the folder of a Hugging Face Hub model, from the huggingface_hub cache
- :func:`save_to` / :func:`restore_from` a model with its config and artifacts as one
  NeMo-compatible archive; :class:`ArchiveMixin` adds both to an ``nn.Module`` subclass
- :func:`save_checkpoint` / :func:`load_checkpoint` training state (model, optimizer, scheduler,
  user content) in NxD's layout on one process or across TP/PP/DP ranks, async, crash-safe, with
  retention and checksummed resume; :func:`finalize_checkpoint` waits for an async save
- :mod:`shardwise.distributed`: the parallel coordinates a training run passes in
- the errors in :mod:`shardwise.errors`
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

# Public name -> the module that defines it, imported on first use (PEP 562): ``shardwise --help``
# and every command start without importing the parts they do not run (about 0.12 s per call).
_EXPORTS = {
    "ArchiveMixin": "archive", "RestoredArchive": "archive", "restore_from": "archive", "save_to": "archive",
    "ConvertResult": "engine", "convert": "engine",
    "FormatError": "errors", "HubError": "errors", "IntegrityError": "errors", "LayoutError": "errors", "OptionError": "errors",
    "OutputExistsError": "errors", "ShardwiseError": "errors", "UnsafeCheckpointError": "errors",
    "Checkpoint": "formats", "open": ("formats", "open_checkpoint"),
    "hf_model_path": "hub",
    "inspect": ("report", "inspect_path"),
    "StoredTensor": "tensors", "TensorInfo": "tensors", "TensorSource": "tensors",
    "finalize_checkpoint": "training", "load_checkpoint": "training", "save_checkpoint": "training",
    "DiffReport": "verify", "Mismatch": "verify", "diff": "verify",
    "clip_infer": "verify", "ClipScores": "verify",
}


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
    module, attribute = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "__version__",
    "open", "convert", "diff", "inspect", "hf_model_path", "save_to", "restore_from", "ArchiveMixin", "RestoredArchive",
    "Checkpoint", "ConvertResult", "DiffReport", "Mismatch", "TensorInfo", "TensorSource", "StoredTensor",
    "ShardwiseError", "FormatError", "UnsafeCheckpointError", "OutputExistsError", "IntegrityError",
    "LayoutError", "OptionError", "HubError", "save_checkpoint", "load_checkpoint", "finalize_checkpoint", "clip_infer", "ClipScores",
]
