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

from .archive import ArchiveMixin, RestoredArchive, restore_from, save_to
from .engine import ConvertResult, convert
from .errors import (
    FormatError,
    HubError,
    IntegrityError,
    LayoutError,
    OptionError,
    OutputExistsError,
    ShardwiseError,
    UnsafeCheckpointError,
)
from .formats import Checkpoint, open_checkpoint as open  # noqa: A001 - the documented name
from .hub import hf_model_path
from .report import inspect_path as inspect
from .tensors import StoredTensor, TensorInfo, TensorSource
from .training import finalize_checkpoint, load_checkpoint, save_checkpoint
from .verify import ClipScores, DiffReport, Mismatch, clip_infer, diff

__all__ = [
    "__version__",
    "open", "convert", "diff", "inspect", "hf_model_path", "save_to", "restore_from", "ArchiveMixin", "RestoredArchive",
    "Checkpoint", "ConvertResult", "DiffReport", "Mismatch", "TensorInfo", "TensorSource", "StoredTensor",
    "ShardwiseError", "FormatError", "UnsafeCheckpointError", "OutputExistsError", "IntegrityError",
    "LayoutError", "OptionError", "HubError", "save_checkpoint", "load_checkpoint", "finalize_checkpoint", "clip_infer", "ClipScores",
]
