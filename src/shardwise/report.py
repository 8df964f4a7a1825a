"""What ``inspect`` reports about a checkpoint, as plain data (the CLI renders it as a table or JSON).

Built from headers only: no tensor data is read, and for safetensors torch is not even imported.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .errors import ShardwiseError
from .formats import Checkpoint, MergedSource, open_checkpoint
from .storage import accepts_urls

__all__ = ["describe", "inspect_path"]


def describe(ckpt: Checkpoint) -> dict:
    """The ``inspect --json`` object: format, counts, dtypes, tensors, config, layout and extras
    (:func:`inspect_path` adds ``parallel`` and ``integrity``, what was checked against a manifest)."""
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


@accepts_urls(inputs=("path", "config"), headers_only=True)
def inspect_path(path: str | os.PathLike, *, trust_pickle: bool = False, config: str | os.PathLike | None = None) -> dict:
    """Open ``path`` lazily and describe it (see :func:`describe`).

    Sharded checkpoints (nxdt folders, nemo-dir folders, sharded archives) list their tensors as
    ``<rank file>/<name>`` and add ``parallel``: container, style, TP/PP, Q/K/V options, KV
    replication, vocabulary padding and the layers of each pipeline stage (or ``error`` saying
    what is needed to tell, such as ``--config``).
    """
    from .reshard.containers import find_shards
    from .reshard.convert import layout_route, shards_need_engine
    from .reshard.integrity import archive_files

    shards = find_shards(Path(path), trust_pickle=trust_pickle) if Path(path).is_dir() else None
    if shards is not None:  # found once: described, then (when the engine reads them) handed to the layout summary
        try:
            summary = describe(_shards_checkpoint(shards))
            summary["integrity"] = _integrity(shards.manifest, len(shards.listed))
            route = shards if shards_need_engine(shards) else None
        except BaseException:
            shards.close()
            raise
        if route is None:
            shards.close()
    else:
        with open_checkpoint(path, trust_pickle=trust_pickle) as ckpt:
            summary = describe(ckpt)
            manifest = ckpt.archive.manifest if ckpt.archive is not None else None
            summary["integrity"] = _integrity(manifest, len(archive_files(ckpt.archive)) if manifest is not None else 0)
        route = layout_route(path, "hf", {}, trust_pickle=trust_pickle)
    summary["parallel"] = _parallel_summary(route, config, trust_pickle) if route is not None else None
    return summary


def _integrity(manifest: dict | None, files: int) -> str:
    """What inspect checked against the manifest: sizes only (a stat each; a damaged size is an
    IntegrityError before this is reached). CRC-32s need every byte read, which inspect does not do."""
    if manifest is None:
        return "no shardwise manifest: nothing to check the files against"
    return f"sizes of the {files} files the manifest lists match it; CRC-32s not verified (inspect reads headers only; diff and convert verify them)"


def _shards_checkpoint(shards) -> Checkpoint:
    from .formats.hf import TOKENIZER_FILES
    from .formats.nemo2 import companion_files as nemo2_files
    from .formats.torch_dist import TorchDistSource

    source = shards.sources[(0, 0)]
    if isinstance(source, TorchDistSource):  # one checkpoint of global tensors, not per-rank files
        companions = [name for name, _ in nemo2_files(shards.path)] if shards.container == "nemo2" else []
        return Checkpoint(
            str(shards.path), shards.container, "dcp", source, [shards.files[(0, 0)]], config=shards.nemo_config or shards.hf_config,
            layout=source.layout(), training_state=source.training_state,
            companion_files=companions, tokenizer_files=[n for n in companions if n in TOKENIZER_FILES],
        )
    keys = sorted(shards.sources)
    prefixes = [Path(shards.files[k]).parent.name + "/" if shards.container == "nemo-dir" else Path(shards.files[k]).name + "/" for k in keys]
    source = MergedSource([shards.sources[k] for k in keys], prefixes)
    layout = {"kind": "sharded", "tp": shards.tp, "pp": shards.pp}
    return Checkpoint(str(shards.path), shards.container, "torch", source, [shards.files[k] for k in keys], config=shards.nemo_config, layout=layout)


def _parallel_summary(path, config, trust_pickle: bool) -> dict:
    from .layout.parallel import padded_vocab
    from .reshard.model import open_model

    try:
        with open_model(path, config=config, trust_pickle=trust_pickle) as model:
            layout = model.layout
            return {
                "container": model.container,
                "encoding": model.encoding,
                "style": layout.style,
                "tp": layout.tp,
                "pp": layout.pp,
                "qkv": layout.qkv,
                "norms": layout.norms,
                "kv_size_multiplier": layout.kv_multiplier,
                "vocab": model.dims.vocab,
                "padded_vocab": padded_vocab(model.dims.vocab, layout.vocab_multiple, layout.tp) if layout.vocab_multiple else model.dims.vocab,
                "stages": [{"pp_rank": p, "first_layer": first, "num_layers": count} for p, (first, count) in enumerate(layout.stages)],
                "dims": model.dims.as_dict(),
                "has_manifest": model.has_manifest,
                "warnings": model.warnings,
            }
    except ShardwiseError as e:
        return {"error": str(e)}
