"""Opening any CLIP checkpoint as one model with a known layout, and telling whether a path holds one.

Sources (``container``):

- ``hf``: a transformers ``CLIPModel`` folder (``config.json`` with ``model_type: clip``);
- ``openclip``: an OpenCLIP folder as OpenCLIP publishes them (``open_clip_config.json`` with
  ``model_cfg`` and ``preprocess_cfg``, weights in ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``), or a bare OpenCLIP state dict with ``arch`` naming one of the
  standard ViT architectures; its tensors are seen under HF names through views of the file
  (rows of ``in_proj_weight``, transposed projections), nothing is copied;
- ``archive`` / ``nemo-dir``: a Megatron-core CLIP archive (NeMo's ``.nemo`` layout) at any TP,
  packed or unpacked, written by shardwise (dimensions from its manifest) or by NeMo (from its
  ``model_config.yaml``).

Every tensor on disk is checked against what the dimensions predict before anything is written:
a missing or extra tensor, or a shape that does not fit, is one LayoutError naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, LayoutError, OptionError
from ..formats import Checkpoint, open_checkpoint
from ..formats.hf import TOKENIZER_FILES, companion_files, read_config
from ..formats.views import ViewSource
from ..jsonfile import read_json_object
from ..layout.clip_sharding import clip_shard_plan
from ..layout.tiles import TiledTensor, whole
from ..models.clip import HF, MCORE, OPENCLIP, OPENCLIP_NOT_WEIGHTS, ClipDims, canonical_infos, name_of
from ..models.clip_configs import dims_from_hf_config, dims_from_nemo_config, dims_from_openclip, hf_config_from_dims, is_clip_nemo_config, openclip_arch
from ..tensors import FileTensorSource, TensorInfo
from .containers import Shards, encoding_of, find_shards
from .planned import PlannedModel, check_shard, plan_with_stored_dtypes

__all__ = ["ClipModel", "open_clip_model", "clip_source_kind", "OPENCLIP_CONFIG", "OPENCLIP_WEIGHTS"]

Shard = tuple[int, int]
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_KIND = "clip"  # the manifest's parallel.model for CLIP archives


@dataclass
class ClipModel(PlannedModel):
    """A CLIP checkpoint in some layout, with the plan relating its stored tensors to the canonical (HF) ones.

    ``plan`` maps each shard (tp_rank, 0) to its stored tensors as tiles of the canonical tensors
    (for ``hf`` and ``openclip`` sources, one shard whose tensors are the canonical ones). Close it
    to release files.
    """

    path: str
    container: str
    dims: ClipDims
    tp: int
    hf_config: dict
    canonical: dict[str, TensorInfo]
    plan: dict[Shard, list[TiledTensor]]
    shards: dict[Shard, FileTensorSource]
    nemo_config: dict | None = None
    checkpoint: Checkpoint | None = None
    archive: Any = None
    encoding: str = "torch"
    warnings: list[str] = field(default_factory=list)
    generation_config: dict | None = None  # CLIP has none; named for the companion-file helpers shared with Llama
    files: dict[Shard, str] = field(default_factory=dict)
    listed: list = field(default_factory=list)  # the files the manifest lists, for their CRC-32s (.integrity.ListedFile)
    _closers: list = field(default_factory=list)

    def stored(self, tp_rank: int, tower: str, role: str, layer: int | None = None):
        """The stored tensor of an mcore ``role`` on rank ``tp_rank``, as a torch tensor (archives only)."""
        return self.shards[(tp_rank, 0)].read(name_of(MCORE, tower, role, layer))



# -- what a path is ------------------------------------------------------------------------------
def clip_source_kind(path: str | os.PathLike, arch: str | None = None) -> str | None:
    """``hf``, ``openclip`` or ``mcore`` when ``path`` holds a CLIP shardwise reads as one, else None.

    Cheap: configs only (for an archive, its tar headers and ``model_config.yaml``). ``arch`` marks
    a bare OpenCLIP state dict. Unreadable paths are None here; the conversion that follows reports them.
    """
    path = Path(path)
    if arch is not None:
        return "openclip"
    try:
        if path.is_dir():
            if (path / "config.json").is_file() and read_config(path / "config.json").get("model_type") == "clip":
                if any((path / name).is_file() for name in _HF_WEIGHTS) or not (path / OPENCLIP_CONFIG).is_file():
                    return "hf"
            if (path / OPENCLIP_CONFIG).is_file():
                return "openclip"
            if (path / "model_config.yaml").is_file():
                from ..archive.reader import read_model_config

                return "mcore" if is_clip_nemo_config(read_model_config(path / "model_config.yaml")) else None
            return None
        if path.is_file():
            from ..formats import _is_archive

            if _is_archive(path):
                from ..archive.reader import Archive

                with Archive(path) as archive:
                    return "mcore" if is_clip_nemo_config(archive.model_config) else None
    except (OSError, FormatError):
        return None
    return None


def open_clip_model(path: str | os.PathLike, *, arch: str | None = None, trust_pickle: bool = False, kind: str | None = None) -> ClipModel:
    """Open the CLIP at ``path`` (see module docstring); ``arch`` names the architecture of a bare OpenCLIP state dict.

    ``kind`` is :func:`clip_source_kind` of ``path`` when the caller has it already (it is found otherwise).

    Raises FormatError, LayoutError or OptionError naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    kind = kind or clip_source_kind(path, arch)
    if kind == "hf":
        return _open_hf(path, trust_pickle)
    if kind == "openclip":
        return _open_openclip(path, arch, trust_pickle)
    if kind == "mcore":
        shards = find_shards(path, trust_pickle=trust_pickle)
        if shards is None:
            raise FormatError(f"{path}: a CLIP model_config.yaml but no weights")
        try:
            return _open_mcore(shards)
        except BaseException:
            shards.close()
            raise
    raise FormatError(
        f"{path}: not a CLIP checkpoint shardwise reads (an HF CLIPModel folder, an OpenCLIP folder with {OPENCLIP_CONFIG}, "
        f"a Megatron-core CLIP archive, or an OpenCLIP state dict with --arch)"
    )


# -- HF and OpenCLIP: one shard whose tensors are the canonical ones ----------------------------------
def _identity(label: str, container: str, dims: ClipDims, source: FileTensorSource, hf_config: dict, *,
              stored_as: dict[str, str] | None = None, tolerate=lambda name: False, hint: str = "") -> ClipModel:
    """A model whose single shard holds the canonical tensors by name; every one checked against ``dims``.

    ``stored_as`` names, for messages, what each canonical tensor is called in the file; ``hint`` ends them.
    """
    expected = canonical_infos(dims, "float32")
    stored_as = stored_as or {}
    names = set(source.keys())
    for name, info in expected.items():
        shown = stored_as.get(name, name)
        if name not in names:
            raise LayoutError(f"{label}: has no tensor {shown}, which a CLIP of this configuration needs")
        actual = source.info(name).shape
        if tuple(actual) != info.shape:
            raise LayoutError(f"{label}: {shown} has shape {list(actual)}; the configuration predicts {list(info.shape)}{hint}")
    extra = [n for n in source.keys() if n not in expected and not tolerate(n)]
    if extra:
        raise LayoutError(f"{label}: holds {len(extra)} tensor(s) a CLIP of this configuration does not have, e.g. {stored_as.get(extra[0], extra[0])}")
    canonical = {name: source.info(name) for name in expected}
    plan = {(0, 0): [whole(info, name) for name, info in canonical.items()]}
    return ClipModel(label, container, dims, 1, hf_config, canonical, plan, {(0, 0): source}, encoding=_kind(source), files={(0, 0): label})


def _kind(source: FileTensorSource) -> str:
    from ..formats import weights_kind

    return weights_kind(getattr(source, "base", source))


def _open_hf(folder: Path, trust_pickle: bool) -> ClipModel:
    ckpt = open_checkpoint(folder, trust_pickle=trust_pickle)
    try:
        if ckpt.format != "hf":
            raise FormatError(f"{folder}: has no config.json")
        preprocessor = folder / "preprocessor_config.json"
        dims = dims_from_hf_config(ckpt.config, str(folder / "config.json"), read_json_object(preprocessor, "preprocessor config") if preprocessor.is_file() else None)
        # transformers < 4.31 saved the position_ids buffers; NeMo's converter drops them, and so does shardwise
        model = _identity(str(folder), "hf", dims, ckpt.tensors, ckpt.config, tolerate=lambda n: n.endswith("embeddings.position_ids"))
    except BaseException:
        ckpt.close()
        raise
    model.checkpoint = ckpt
    return model


def _open_openclip(path: Path, arch: str | None, trust_pickle: bool) -> ClipModel:
    warnings: list[str] = []
    folder = path if path.is_dir() else None
    if folder is not None and (folder / OPENCLIP_CONFIG).is_file():
        if arch is not None:
            raise OptionError(f"--arch {arch}: {folder / OPENCLIP_CONFIG} names the architecture already; leave --arch out")
        document = read_json_object(folder / OPENCLIP_CONFIG, "OpenCLIP config")
        label = str(folder / OPENCLIP_CONFIG)
        dims = dims_from_openclip(document.get("model_cfg"), document.get("preprocess_cfg"), label, warnings=warnings)
    else:
        dims = dims_from_openclip(openclip_arch(arch), None, f"--arch {arch}")
    weights = _openclip_weights(path)
    ckpt = open_checkpoint(weights, trust_pickle=trust_pickle)
    try:
        base = ckpt.tensors
        prefix = "module." if base.keys() and all(n.startswith("module.") for n in base.keys()) else ""  # saved from DDP
        views, stored_as = {}, {}
        layers, tower_names = OPENCLIP
        for tower in ("vision", "text"):
            for layer in range(dims.tower(tower).layers):
                for role, (template, view) in layers[tower].items():
                    views[name_of(HF, tower, role, layer)] = (prefix + template.format(i=layer), view)
        for (tower, role), (stored, view) in tower_names.items():
            views[name_of(HF, tower, role)] = (prefix + stored, view)
        present = set(base.keys())
        for name, (stored, _) in views.items():
            stored_as[name] = stored
            if stored not in present:
                raise LayoutError(f"{weights}: has no tensor {stored}, which this OpenCLIP architecture needs" + (f" (check --arch {arch})" if arch else ""))
        used = {stored for stored, _ in views.values()} | {prefix + n for n in OPENCLIP_NOT_WEIGHTS}
        extra = [n for n in base.keys() if n not in used]
        if extra:
            raise LayoutError(f"{weights}: holds {len(extra)} tensor(s) a standard OpenCLIP ViT-CLIP does not have, e.g. {extra[0]}")
        source = ViewSource(base, views)
    except BaseException:
        ckpt.close()
        raise
    label = str(path)
    try:
        model = _identity(label, "openclip", dims, source, hf_config_from_dims(dims), stored_as=stored_as, hint=f" (check --arch {arch})" if arch else "")
    except BaseException:
        source.close()
        raise
    if folder is not None:
        companions = [p.name for p in companion_files(folder)]
        model.checkpoint = Checkpoint(str(folder), "openclip", model.encoding, source, [str(weights)], companion_files=companions,
                                      tokenizer_files=[n for n in companions if n in TOKENIZER_FILES])
    model.warnings += warnings
    return model


def _openclip_weights(path: Path) -> Path:
    """The weights file of an OpenCLIP folder (safetensors first), or ``path`` itself when it is a file."""
    if path.is_file():
        return path
    for name in OPENCLIP_WEIGHTS:
        if (path / name).is_file():
            return path / name
    from ..formats.hf import find_weights

    found = find_weights(path)
    if len(found.files) != 1:
        raise FormatError(f"{path}: holds {len(found.files)} weight files and none named {' or '.join(OPENCLIP_WEIGHTS)}; give the state dict file itself")
    return found.files[0]


# -- Megatron-core archives ------------------------------------------------------------------------
def _open_mcore(shards: Shards) -> ClipModel:
    label = str(shards.path)
    nemo = shards.nemo_config or {}
    if not is_clip_nemo_config(nemo):
        raise FormatError(f"{label}: is not a CLIP archive (its model_config.yaml has no vision and text sections)")
    if shards.pp != 1:
        raise LayoutError(f"{label}: has {shards.pp} pipeline stages; shardwise reads CLIP archives with pipeline size 1, as NeMo writes them")
    tp, warnings = shards.tp, []
    embed_name = name_of(MCORE, "text", "token")
    first = shards.sources[(0, 0)]
    if embed_name not in first:
        raise LayoutError(f"{shards.files[(0, 0)]}: has no {embed_name}; not a Megatron-core CLIP")
    padded = first.info(embed_name).shape[0] * tp
    parallel = (shards.manifest or {}).get("parallel")
    hf_config = shards.hf_config
    if isinstance(parallel, dict) and parallel.get("model") == MODEL_KIND and isinstance(parallel.get("dims"), dict):
        dims = ClipDims.from_dict(parallel["dims"], f"{label}: shardwise.json")
        hf_config = hf_config or parallel.get("config")
    else:
        vocab = ((hf_config or {}).get("text_config") or {}).get("vocab_size")
        if vocab is None:
            vocab = padded
            warnings.append(f"{label}: records no vocabulary size; the word embedding keeps its {padded} padded rows")
        dims = dims_from_nemo_config(nemo, f"{label}: model_config.yaml", vocab=vocab)
    if hf_config is None:
        warnings.append(f"{label}: carries no HF config.json; one is built from its model_config.yaml")
        hf_config = hf_config_from_dims(dims)
    stored = {shard: {n: source.info(n) for n in source.keys()} for shard, source in shards.sources.items()}
    canonical, plan = plan_with_stored_dtypes(lambda c: clip_shard_plan(dims, c, tp, padded), canonical_infos(dims, "float32"), stored)
    for shard, tensors in plan.items():
        check_shard(shards.files[shard], tensors, stored[shard], model="a Megatron-core CLIP", hint="check the archive's model_config.yaml")
    return ClipModel(
        label, shards.container, dims, tp, hf_config, canonical, plan, dict(shards.sources), nemo_config=nemo,
        archive=shards.archive, encoding=encoding_of(label, shards.sources), warnings=warnings, files=dict(shards.files),
        listed=shards.listed, _closers=list(shards.closers),
    )

