"""Conversions into and out of archives: Lightning ``.ckpt`` (one file or NeMo's rank folders),
HuggingFace folders, and plain weight files to an archive; an archive back to a HuggingFace folder.

All in one CPU process, streaming: each rank's ``state_dict`` tensors are copied from the
checkpoint straight into the archive, and optimizer states are never read.

An HF folder becomes an archive whose ``model_config.yaml`` mirrors ``config.json`` and names
three artifacts: the original ``config.json`` (``hf_config_file``), the tokenizer files
(``tokenizer: {library: huggingface, type: nemo:<hash>_tokenizer}``, a folder that
``AutoTokenizer.from_pretrained`` loads) and any other non-weight files such as
sentence-transformers' ``modules.json`` and ``1_Pooling/`` (``hf_extra_files``). Converting back
restores all three next to the weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..dtypes import parse_cast_dtype
from ..engine import ConvertResult
from ..errors import FormatError, LayoutError, OptionError
from ..formats import Checkpoint, open_checkpoint
from ..formats.hf import TOKENIZER_FILES, TRAINER_STATE, is_weight_file
from ..formats.rank_folders import find_rank_checkpoints, has_rank_folders
from ..formats.torch_pickle import TorchFile
from ..plan import plan_output
from ..progress import NO_PROGRESS, Progress
from .artifacts import HASHED_PREFIX, NEMO_PREFIX, PlannedArtifact, config_value, make_artifact, plan_artifacts, set_config_value
from .layout import HF_CONFIG_KEY
from .reader import Archive, read_yaml_config, write_members
from .writer import planned_shards, write_archive

__all__ = ["convert_to_archive", "export_hf_files", "HF_CONFIG_KEY", "HF_EXTRA_KEY", "TOKENIZER_KEYS"]

HF_EXTRA_KEY = "hf_extra_files"
TOKENIZER_KEYS = ("tokenizer.model", "tokenizer.tokenizer_model", "tokenizer.vocab_file", "tokenizer.merge_file")


def convert_to_archive(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    weights_format: str | None = None,
    dtype: str | None = None,
    hparams_file: str | os.PathLike | None = None,
    checkpoint_name: str | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: Progress = NO_PROGRESS,
):
    """Write ``src`` (Lightning .ckpt, NeMo rank folders, HF folder, or weight file) as an archive at ``dst``.

    The config comes from ``hparams_file`` when given (its ``cfg`` mapping if it has one), else
    from the checkpoint: ``hyper_parameters.cfg`` (or all hyper-parameters) for Lightning files,
    config.json for HF folders. Tokenizer files the config names under ``tokenizer.*`` are packed
    as artifacts when they exist. Returns a ConvertResult with warnings for what was left out.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    cast = parse_cast_dtype(dtype) if dtype else None
    weights_format = weights_format or "torch"
    warnings: list[str] = []
    if has_rank_folders(src):
        tp, pp, files = find_rank_checkpoints(src, checkpoint_name)
        sources = {ranks: TorchFile(path, trust=trust_pickle) for ranks, path in files.items()}
        hparams = (sources[(0, 0)].training_state or {}).get("hyper_parameters")
        config, artifacts = _lightning_config(hparams, src, hparams_file, warnings)
        closers = list(sources.values())
    else:
        if checkpoint_name is not None:
            raise OptionError(f"{src}: --checkpoint-name applies to folders of mp_rank_XX / tp_rank_XX_pp_rank_XXX checkpoints")
        ckpt = open_checkpoint(src, trust_pickle=trust_pickle)
        closers = [ckpt]
        if ckpt.format == "archive":
            ckpt.close()
            raise OptionError(f"{src}: is already an archive; unpack and pack it, or convert it --to hf")
        tp, pp, sources = 1, 1, {(0, 0): ckpt.tensors}
        if ckpt.format == "hf":
            config, artifacts = _hf_config(ckpt, hparams_file)
        else:
            hparams = ckpt.config if ckpt.format == "lightning" else None
            config, artifacts = _lightning_config(hparams, src, hparams_file, warnings)
    try:
        kind = "torch" if weights_format == "torch" else "safetensors"
        shards = planned_shards(
            [(t, p, source, plan_output(source.infos(), to=kind, cast=cast).files[0]) for (t, p), source in sorted(sources.items())], progress
        )
        written = write_archive(
            dst, config=config, shards=shards, tp=tp, pp=pp, weights_format=weights_format,
            artifacts=artifacts, overwrite=overwrite, progress=progress,
        )
    finally:
        for closer in closers:
            closer.close()
    total = sum(s.nbytes for s in shards)
    return ConvertResult(
        str(dst), "archive", tuple(m.name for m in written), sum(len(s.infos) for s in shards), total,
        time.perf_counter() - started, tuple(warnings),
    )


def _lightning_config(hparams, src: Path, hparams_file, warnings: list[str]) -> tuple[dict, list[PlannedArtifact]]:
    if hparams_file is not None:
        hparams = read_yaml_config(Path(hparams_file).read_bytes(), str(hparams_file))
    if not isinstance(hparams, dict):
        hparams = {}
        warnings.append(f"{src}: has no hyper-parameters and no --hparams-file was given, so model_config.yaml is empty")
    config = hparams.get("cfg") if isinstance(hparams.get("cfg"), dict) else hparams
    config = dict(config)
    found = {}
    for key in TOKENIZER_KEYS:
        value = config_value(config, key)
        if not isinstance(value, str) or not value:
            continue
        if value.startswith(NEMO_PREFIX):
            warnings.append(f"config {key} is {value}, an artifact of an archive; a .ckpt does not hold it, so it is not packed")
        elif Path(value).exists():
            found[key] = value
        else:
            warnings.append(f"config {key} names {value}, which does not exist here; it is not packed")
    return config, plan_artifacts(config, found)


def _hf_config(ckpt: Checkpoint, hparams_file) -> tuple[dict, list[PlannedArtifact]]:
    folder = Path(ckpt.path)
    if hparams_file is not None:
        raise OptionError(f"{hparams_file}: --hparams-file applies to Lightning checkpoints; an HF folder's config is its config.json")
    config = dict(ckpt.config or {})
    if "tokenizer" in config or HF_CONFIG_KEY in config or HF_EXTRA_KEY in config:
        raise FormatError(f"{folder / 'config.json'}: uses a key shardwise reserves in archives (tokenizer, {HF_CONFIG_KEY}, {HF_EXTRA_KEY})")
    artifacts = [make_artifact(HF_CONFIG_KEY, "config.json", (("", folder / "config.json"),), False)]
    tokenizer = tuple((name, folder / name) for name in ckpt.tokenizer_files)
    if tokenizer:
        config["tokenizer"] = {"library": "huggingface"}
        artifacts.append(make_artifact("tokenizer.type", "tokenizer", tokenizer, True))
    extra = _extra_entries(folder, ckpt)
    if extra:
        artifacts.append(make_artifact(HF_EXTRA_KEY, "hf_extra", extra, True))
    for artifact in artifacts:
        set_config_value(config, artifact.config_key, NEMO_PREFIX + artifact.member)
    return config, artifacts


def _extra_entries(folder: Path, ckpt: Checkpoint) -> tuple[tuple[str, Path], ...]:
    """Non-weight files that are neither config nor tokenizer: top-level companions and weight-free sub-folders."""
    entries = [(name, folder / name) for name in ckpt.companion_files if name != "config.json" and name not in TOKENIZER_FILES]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and not p.is_symlink())
        if files and not any(is_weight_file(p.name) or p.name in TRAINER_STATE for p in files):
            entries.extend((p.relative_to(folder).as_posix(), p) for p in files)
    return tuple(entries)


def export_hf_files(archive: Archive, stage: Path) -> tuple[list[str], list[str]]:
    """Copy an archive's HF config, tokenizer and extra files into folder ``stage``.

    Returns (files written, warnings). Archives made from an HF folder hold all three; a NeMo
    archive has no config.json, which is reported as a warning.
    """
    config = archive.config
    written, warnings = [], []
    archive.hf_config()  # a damaged config.json is refused naming its member, not the copy made of it
    hf_config = config.get(HF_CONFIG_KEY)
    for value in (hf_config, config_value(config, "tokenizer.type"), config.get(HF_EXTRA_KEY)):
        if not (isinstance(value, str) and value.startswith(NEMO_PREFIX)):
            continue
        tree = archive.member_tree(value[len(NEMO_PREFIX):])
        if tree[0].kind == "file":  # <hash>_config.json becomes config.json
            crcs = write_members(archive.index, tree, stage, lambda m: HASHED_PREFIX.sub("", m.name))
            written += [HASHED_PREFIX.sub("", name) for name in crcs]
        else:  # a folder artifact's files go to the top of the HF folder
            inside = len(tree[0].name) + 1
            crcs = write_members(archive.index, tree[1:], stage, lambda m: m.name[inside:])
            written += [name[inside:] for name in crcs]
    if hf_config is None:
        warnings.append(f"{archive.path}: has no HuggingFace config.json (its model_config.yaml is not an HF config), so the folder holds weights{' and tokenizer' if written else ''} only")
    return written, warnings


def check_unsharded(ckpt: Checkpoint, to: str) -> None:
    """Refuse to flatten a sharded archive's per-rank tensors into one model (that needs merging rules)."""
    layout = ckpt.layout or {}
    if layout.get("kind") == "sharded":
        raise LayoutError(
            f"{ckpt.path}: is sharded (TP={layout['tp']}, PP={layout['pp']}); this version cannot merge shards into --to {to}; "
            f"restore one rank with shardwise.restore_from(..., tp_rank=, pp_rank=)"
        )
