"""Where each container keeps its shards: finding the per-rank weight files of a checkpoint.

- ``nxdt``: ``model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt`` (NxD v2; ``dp_rank_00_ep_rank_00_...``
  with expert parallelism, v3), or the older ``tp_rank_XX_pp_rank_XX/checkpoint.pt`` (v1; with
  xser the file ``tp_rank_XX_pp_rank_XX``); any of them may be xser reference files
  (:mod:`shardwise.formats.xser`), read transparently;
- ``archive``: a ``.nemo`` tar (``model_weights.ckpt`` at the root, or in ``mp_rank_XX/`` /
  ``tp_rank_XX_pp_rank_XXX/``), read in place;
- ``nemo-dir``: the same members unpacked in a folder;
- ``torch_dist``: a bare Megatron ``torch_dist`` folder (``metadata.json``, ``.metadata``,
  ``*.distcp``), the ``model_weights/`` of an archive or nemo-dir on its own, or the ``weights/``
  of a NeMo 2 checkpoint;
- ``nemo2``: a NeMo 2 checkpoint folder (``context/model.yaml``, ``weights/`` torch_dist with
  ``module.`` keys; :mod:`shardwise.formats.nemo2`);
- ``hf``: any unsharded checkpoint shardwise opens (HF folders, safetensors, torch files).

An archive or nemo-dir whose weights are a ``model_weights/`` torch_dist checkpoint, a NeMo 2
folder, and a bare torch_dist folder, hold one "shard": the whole model with its layers unstacked
(:class:`~shardwise.formats.torch_dist.TorchDistSource`), in the mcore style at TP=1, PP=1,
whatever parallel layout wrote it (its keys are global).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..archive.layout import CONFIG_NAME, DISTRIBUTED_FOLDER, MANIFEST_NAME, detect_layout, grid_of
from ..archive.reader import read_model_config
from ..errors import FormatError
from ..formats.hf import read_config
from ..formats.safetensors import SafetensorsFile
from ..jsonfile import read_json_object
from ..formats.nemo2 import MODEL_YAML, CONTEXT, NEMO2_CONFIG_FILE, WEIGHTS, looks_like_nemo2, read_context
from ..formats.torch_dist import TorchDistSource, looks_like_torch_dist
from ..formats.torch_pickle import TorchFile
from ..tensors import FileTensorSource
from ..training.layout import parse_rank_file, rank_file_name
from .integrity import archive_files, listed_files

__all__ = ["Shards", "find_shards", "nxdt_file_name", "CONTAINERS", "read_folder_manifest", "encoding_of"]

CONTAINERS = ("hf", "nxdt", "archive", "nemo-dir")
_NXDT_V1 = re.compile(r"tp_rank_(\d+)_pp_rank_(\d+)")


def nxdt_file_name(tp_rank: int, pp_rank: int) -> str:
    """NxD's name for one model shard inside ``model/``."""
    return rank_file_name(0, tp_rank, pp_rank)


@dataclass
class Shards:
    """The per-rank weight sources of one checkpoint, and what the container says about itself."""

    path: Path
    container: str
    sources: dict[tuple[int, int], FileTensorSource]
    files: dict[tuple[int, int], str]
    manifest: dict | None = None
    nemo_config: dict | None = None
    archive: Any = None  # an open shardwise.archive.Archive for archives
    hf_config: dict | None = None
    closers: list = field(default_factory=list)
    config_file: str = CONFIG_NAME  # how messages name the NeMo config that nemo_config came from
    listed: list = field(default_factory=list)  # the files its manifest lists, sizes checked (ListedFile, .integrity)

    @property
    def tp(self) -> int:
        return max(t for t, _ in self.sources) + 1

    @property
    def pp(self) -> int:
        return max(p for _, p in self.sources) + 1

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        for closer in self.closers:
            closer.close()

    def __enter__(self) -> "Shards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encoding_of(label: str, sources: dict[tuple[int, int], FileTensorSource]) -> str:
    """How the shards store their tensors: ``xser`` (torch-xla per-tensor files), ``safetensors``, ``torch``
    or ``dcp`` (a torch_dist checkpoint's chunks).

    Shards that disagree are a FormatError (no reader handles a mixed checkpoint).
    """
    from ..formats import weights_kind

    kinds = {"xser" if getattr(s, "xser", False) else "dcp" if isinstance(s, TorchDistSource) else weights_kind(s) for s in sources.values()}
    if len(kinds) > 1:
        raise FormatError(f"{label}: shards are stored in different encodings ({', '.join(sorted(kinds))}); the checkpoint is mixed")
    return kinds.pop() if kinds else "torch"


def read_folder_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_NAME
    return read_json_object(path, "manifest") if path.is_file() else None


def find_shards(path: Path, *, trust_pickle: bool = False) -> Shards | None:
    """The shards of ``path`` when it is a sharded container (nxdt, archive, nemo-dir, nemo2, torch_dist), else None."""
    if path.is_file():
        from ..formats import _is_archive

        return _archive_shards(path, trust_pickle) if _is_archive(path) else None
    if not path.is_dir():
        raise FormatError(f"{path}: no such file or folder")
    if looks_like_nemo2(path):
        return _nemo2_shards(path, trust_pickle)
    if looks_like_torch_dist(path):
        return _torch_dist_shards(path, trust_pickle)
    nxdt = _nxdt_files(path)
    if nxdt:
        folder = path if (path / MANIFEST_NAME).is_file() or not (path.parent / MANIFEST_NAME).is_file() else path.parent
        manifest = read_folder_manifest(folder)
        listed = listed_files(folder, manifest, under=sorted({file.parent for file in nxdt.values()}))  # a tag's optimizer files are not read
        sources = {key: _open(file, trust_pickle) for key, file in nxdt.items()}
        return Shards(path, "nxdt", sources, {k: str(v) for k, v in nxdt.items()}, manifest=manifest, listed=listed)
    if (path / CONFIG_NAME).is_file():
        return _nemo_dir_shards(path, trust_pickle)
    return None


def _nxdt_files(path: Path) -> dict[tuple[int, int], Path]:
    folder = path / "model" if (path / "model").is_dir() else path
    found: dict[tuple[int, int], Path] = {}
    for child in sorted(folder.iterdir()):
        ranks = parse_rank_file(child.name)
        if ranks is not None and ranks.dp is not None and child.is_file():
            if ranks.dp == 0 and not ranks.ep:
                found[(ranks.tp, ranks.pp)] = child
            continue
        m = _NXDT_V1.fullmatch(child.name)
        if m and (child / "checkpoint.pt").is_file():
            found[(int(m.group(1)), int(m.group(2)))] = child / "checkpoint.pt"
        elif m and child.is_file():  # v1 saved with xser: the file itself, tensors in <name>.tensors/
            found[(int(m.group(1)), int(m.group(2)))] = child
    if found:
        _check_grid(path, found)
    return found


def _check_grid(path: Path, found: dict[tuple[int, int], Any]) -> None:
    tp, pp, gap = grid_of(found)
    if gap is not None:
        raise FormatError(f"{path}: checkpoint is incomplete: TP={tp}, PP={pp} but the shard of tp_rank {gap[0]}, pp_rank {gap[1]} is missing")


def _open(file: Path, trust_pickle: bool) -> FileTensorSource:
    if file.name.endswith(".safetensors"):
        return SafetensorsFile(file)
    return TorchFile(file, trust=trust_pickle)


def _archive_shards(path: Path, trust_pickle: bool) -> Shards:
    from ..archive.reader import Archive

    archive = Archive(path)
    try:
        layout = archive.layout
        if layout.kind == "distributed":
            sources = {(0, 0): archive.weights(trust_pickle=trust_pickle)}
            files = {(0, 0): f"{path}:{DISTRIBUTED_FOLDER}"}
        else:
            sources = {key: archive.weights(*key, trust_pickle=trust_pickle) for key in layout.shards}
            files = {k: f"{path}:{v}" for k, v in layout.shards.items()}
        hf_config = archive.hf_config()
        manifest = archive.manifest
        listed = archive_files(archive)
    except BaseException:
        archive.close()
        raise
    return Shards(
        path, "archive", sources, files, manifest=manifest,
        nemo_config=archive.model_config, archive=archive, hf_config=hf_config, closers=[archive], listed=listed,
    )


def _nemo_dir_shards(folder: Path, trust_pickle: bool) -> Shards:
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    layout = detect_layout(names, str(folder))
    if layout.kind == "distributed":
        weights = folder / DISTRIBUTED_FOLDER
        sources: dict[tuple[int, int], FileTensorSource] = {(0, 0): TorchDistSource(weights, trust=trust_pickle)}
        files = {(0, 0): str(weights)}
    else:
        sources = {key: _open(folder / member, trust_pickle) for key, member in layout.shards.items()}
        files = {k: str(folder / v) for k, v in layout.shards.items()}
    hf_config = None
    for candidate in folder.glob("*config.json"):
        hf_config = read_config(candidate)
        break
    manifest = read_folder_manifest(folder)
    return Shards(
        folder, "nemo-dir", sources, files,
        manifest=manifest, nemo_config=read_model_config(folder / CONFIG_NAME), hf_config=hf_config, listed=listed_files(folder, manifest),
    )


def _torch_dist_shards(folder: Path, trust_pickle: bool) -> Shards:
    """A bare torch_dist folder; its config is a config.json inside it, or, for the ``model_weights``
    folder of an unpacked archive, the ``model_config.yaml`` next to it, and for the ``weights``
    folder of a NeMo 2 checkpoint, the ``context/`` beside it (``--config`` overrides them all)."""
    nemo2 = folder.name == WEIGHTS and (folder.parent / CONTEXT / MODEL_YAML).is_file()  # folder itself was checked to be torch_dist
    nemo_config, hf_config = _nemo2_configs(folder.parent) if nemo2 else (None, None)
    source = TorchDistSource(folder, trust=trust_pickle)
    try:
        hf_config = read_config(folder / "config.json") if (folder / "config.json").is_file() else hf_config
        beside = folder.parent / CONFIG_NAME
        if folder.name == DISTRIBUTED_FOLDER and beside.is_file():
            nemo_config = read_model_config(beside)
    except BaseException:
        source.close()
        raise
    return Shards(
        folder, "torch_dist", {(0, 0): source}, {(0, 0): str(folder)}, nemo_config=nemo_config, hf_config=hf_config,
        config_file=NEMO2_CONFIG_FILE if nemo2 else CONFIG_NAME,
    )


def _nemo2_shards(folder: Path, trust_pickle: bool) -> Shards:
    """A NeMo 2 checkpoint: ``weights/`` (``module.`` keys, shown as mcore's ``model.``) described by ``context/``."""
    nemo_config, hf_config = _nemo2_configs(folder)
    weights = folder / WEIGHTS
    source = TorchDistSource(weights, trust=trust_pickle)
    return Shards(
        folder, "nemo2", {(0, 0): source}, {(0, 0): str(weights)}, nemo_config=nemo_config, hf_config=hf_config,
        config_file=NEMO2_CONFIG_FILE,
    )


def _nemo2_configs(folder: Path) -> tuple[dict, dict | None]:
    """model.yaml's config under NeMo 1 names, and the HF config NeMo's exporter would make when the
    tokenizer in ``context/nemo_tokenizer`` tells the vocabulary size (else None: the rows are kept)."""
    from .nemo_config import dims_from_nemo_config, hf_config_from_nemo, nemo2_view

    context = read_context(folder)
    view = nemo2_view(context.config)
    if context.vocab is None:
        return view, None
    dims = dims_from_nemo_config(view, str(context.path / MODEL_YAML), padded_vocab=context.vocab)
    return view, hf_config_from_nemo(dims, view)
