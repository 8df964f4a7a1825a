"""Opening any checkpoint: detect its format from content, return one lazy :class:`Checkpoint` view.

Detection looks at bytes, not file names: a safetensors header, a zip archive holding
``data.pkl``, torch's legacy pickle, or a folder (see :mod:`shardwise.formats.hf`). Whatever the
format, the result exposes the same things: the tensors (a lazy source), the config, training
state for Lightning files, and the files it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..tensors import FileTensorSource, TensorInfo
from .dcp import DcpSource, looks_like_dcp
from .nemo2 import looks_like_nemo2
from .torch_dist import BACKEND_FILE, COMMON_FILE, TorchDistSource, looks_like_torch_dist
from .hf import TOKENIZER_FILES, companion_files, find_weights, read_config, read_index
from .safetensors import SafetensorsFile, looks_like_safetensors
from .torch_pickle import TorchFile, looks_like_torch
from ..storage import accepts_urls

__all__ = ["Checkpoint", "open_checkpoint", "MergedSource", "weights_kind"]

_NEMO_CONFIG, _NEMO_WEIGHTS = "model_config.yaml", "model_weights"  # an unpacked archive (see shardwise.archive.layout)


class MergedSource(FileTensorSource):
    """Several file sources (the shards of one model) seen as one; duplicate names are an error.

    With ``prefixes`` (one per part), each part's tensors are named ``prefix + name``: the ranks
    of a sharded archive are seen as ``mp_rank_00/...``, ``mp_rank_01/...``.
    """

    def __init__(self, parts: list[FileTensorSource], prefixes: list[str] | None = None) -> None:
        super().__init__()
        self.metadata: dict[str, str] = {}
        for part, prefix in zip(parts, prefixes or [""] * len(parts)):
            self.metadata.update(getattr(part, "metadata", {}))
            for name in part.keys():
                entry = part.stored(name)
                if prefix:
                    entry = replace(entry, info=replace(entry.info, name=prefix + name))
                if entry.info.name in self._tensors:
                    raise FormatError(f"{entry.path}: tensor '{entry.info.name}' also appears in {self._tensors[entry.info.name].path}")
                self._tensors[entry.info.name] = entry
            part.close()


@dataclass
class Checkpoint:
    """A lazily opened checkpoint of any format.

    ``format`` is one of ``safetensors``, ``torch``, ``lightning`` (a file) or ``hf`` (a folder with
    config.json); ``weights_format`` says how the tensors are stored (``safetensors`` or ``torch``).
    ``layout`` is None for unsharded checkpoints. Close it (or use ``with``) to release files.

    >>> with shardwise.open("all-MiniLM-L6-v2") as ckpt:  # doctest: +SKIP
    ...     ckpt.format, len(ckpt.tensors.keys())
    ('hf', 101)
    """

    path: str
    format: str
    weights_format: str
    tensors: FileTensorSource
    files: list[str]
    config: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    companion_files: list[str] = field(default_factory=list)
    tokenizer_files: list[str] = field(default_factory=list)
    training_state: dict[str, Any] | None = None
    layout: dict | None = None
    archive: Any = None  # the open shardwise.archive.Archive, for format "archive"

    def infos(self) -> list[TensorInfo]:
        return [self.tensors.info(name) for name in self.tensors.keys()]

    def close(self) -> None:
        self.tensors.close()
        if self.archive is not None:
            self.archive.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_file(path: Path, trust_pickle: bool) -> FileTensorSource:
    size = path.stat().st_size
    if size == 0:
        raise FormatError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(512)
    if looks_like_safetensors(head, size):
        return SafetensorsFile(path)
    if looks_like_torch(head):
        return TorchFile(path, trust=trust_pickle)
    if len(head) >= 8 and head[8:9] == b"{":
        SafetensorsFile(path)  # raises the precise header error (truncated, oversized length)
    raise FormatError(f"{path}: unknown format: neither safetensors, a torch checkpoint, nor a model folder")


def _open_files(paths: tuple[Path, ...] | list[Path], trust_pickle: bool) -> FileTensorSource:
    if len(paths) == 1:
        return _open_file(paths[0], trust_pickle)
    return MergedSource([_open_file(p, trust_pickle) for p in paths])


@accepts_urls(inputs=("path",), keep_inputs=True)
def open_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a file or folder lazily; raises FormatError (or UnsafeCheckpointError) naming the problem."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path, trust_pickle)
    if _is_archive(path):
        return _open_archive(path, trust_pickle)
    if path.name.endswith(".index.json"):
        shards = read_index(path)
        source = _open_files(shards, trust_pickle)
        kind = weights_kind(source)
        return Checkpoint(str(path), kind, kind, source, [str(p) for p in shards], metadata=_first_metadata(source))
    source = _open_file(path, trust_pickle)
    return Checkpoint(
        str(path),
        getattr(source, "format_name", "safetensors"),
        weights_kind(source),
        source,
        [str(path)],
        config=_lightning_config(source),
        metadata=getattr(source, "metadata", {}),
        training_state=getattr(source, "training_state", None),
    )


def _is_archive(path: Path) -> bool:
    from ..archive.tar_index import looks_like_tar

    with open(path, "rb") as f:
        return looks_like_tar(f.read(512))


def _open_archive(path: Path, trust_pickle: bool) -> Checkpoint:
    """A ``.nemo``-style archive: weights read in place; sharded archives name tensors ``<rank folder>/<name>``."""
    from ..archive.reader import Archive

    archive = Archive(path)
    try:
        layout = archive.layout
        source = archive.all_weights(trust_pickle=trust_pickle)
    except BaseException:
        archive.close()
        raise
    summary = None if layout.kind == "single" else layout.as_dict()
    if isinstance(source, TorchDistSource):
        summary = source.layout()  # the files are listed in ``files``
    return Checkpoint(
        str(path),
        "archive",
        layout.weights_format or "torch_dist",
        source,
        [f"{path}:{name}" for name in (layout.shards.values() or layout.distributed_files)],
        config=archive.model_config,
        metadata=dict(getattr(source, "metadata", {})),
        training_state=getattr(source, "training_state", None),
        layout=summary,
        archive=archive,
    )


def weights_kind(source: FileTensorSource) -> str:
    """``torch`` or ``safetensors``: how a (possibly merged) source stores its tensors."""
    if isinstance(source, TorchFile):
        return "torch"
    if isinstance(source, MergedSource):
        first = next(iter(source.keys()), None)
        return "safetensors" if first is None or source.stored(first).path.endswith(".safetensors") else "torch"
    return "safetensors"


def _first_metadata(source: FileTensorSource) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a single file or of a sharded model's files (merged)."""
    return dict(getattr(source, "metadata", {}))


def _lightning_config(source: FileTensorSource) -> dict | None:
    if getattr(source, "format_name", None) != "lightning":
        return None
    hparams = source.training_state.get("hyper_parameters")
    return hparams if isinstance(hparams, dict) else None


def _open_folder(folder: Path, trust_pickle: bool) -> Checkpoint:
    if looks_like_nemo2(folder):
        return _open_nemo2(folder, trust_pickle)
    if looks_like_torch_dist(folder):
        return _open_dcp(folder, trust_pickle, TorchDistSource)
    if (folder / _NEMO_CONFIG).is_file() and looks_like_torch_dist(folder / _NEMO_WEIGHTS):
        return _open_nemo_dir(folder, trust_pickle)
    if looks_like_dcp(folder):
        return _open_dcp(folder, trust_pickle, DcpSource)
    weights = find_weights(folder)
    source = _open_files(weights.files, trust_pickle)
    config_path = folder / "config.json"
    companions = companion_files(folder)
    return Checkpoint(
        str(folder),
        "hf" if config_path.is_file() else weights.kind,
        weights.kind,
        source,
        [str(p) for p in weights.files],
        config=read_config(config_path) if config_path.is_file() else None,
        metadata=_first_metadata(source),
        companion_files=[p.name for p in companions],
        tokenizer_files=[p.name for p in companions if p.name in TOKENIZER_FILES],
    )


def _open_nemo_dir(folder: Path, trust_pickle: bool) -> Checkpoint:
    """An unpacked archive whose weights are a ``model_weights/`` torch_dist checkpoint, as :func:`_open_archive` opens it packed."""
    from ..archive.reader import read_model_config

    ckpt = _open_dcp(folder / _NEMO_WEIGHTS, trust_pickle, TorchDistSource)
    try:
        config = read_model_config(folder / _NEMO_CONFIG)
    except BaseException:
        ckpt.close()
        raise
    return replace(ckpt, path=str(folder), format="nemo-dir", config=config, companion_files=[], tokenizer_files=[])


def _open_nemo2(folder: Path, trust_pickle: bool) -> Checkpoint:
    """A NeMo 2 checkpoint: ``weights/`` read as torch_dist (``module.`` keys shown as ``model.``), model.yaml's config,
    the tokenizer files of ``context/nemo_tokenizer`` as companions."""
    from .nemo2 import WEIGHTS, companion_files as context_files, read_context

    context = read_context(folder)
    ckpt = _open_dcp(folder / WEIGHTS, trust_pickle, TorchDistSource)
    names = [name for name, _ in context_files(folder)]
    return replace(ckpt, path=str(folder), format="nemo2", config=context.config, companion_files=names, tokenizer_files=[n for n in names if n in TOKENIZER_FILES])


def _open_dcp(folder: Path, trust_pickle: bool, kind: type) -> Checkpoint:
    """A torch.distributed.checkpoint folder, plain (:mod:`.dcp`) or Megatron's torch_dist
    (:mod:`.torch_dist`, layers unstacked): weights read chunk by chunk in place."""
    source = kind(folder, trust=trust_pickle)
    metadata = source.dcp.metadata if isinstance(source, TorchDistSource) else source.metadata
    config_path = folder / "config.json"
    hidden = (BACKEND_FILE, COMMON_FILE) if isinstance(source, TorchDistSource) else ()
    companions = [p for p in companion_files(folder) if not p.name.endswith(".distcp") and p.name not in hidden]  # .metadata is hidden already
    return Checkpoint(
        str(folder),
        source.format_name,
        "dcp",
        source,
        sorted({str(folder / c.file) for t in metadata.tensors.values() for c in t.chunks}),
        config=read_config(config_path) if config_path.is_file() else None,
        companion_files=[p.name for p in companions],
        tokenizer_files=[p.name for p in companions if p.name in TOKENIZER_FILES],
        training_state=source.training_state,
        layout=source.layout(),
    )
