"""HuggingFace model folders: which files are weights, which index maps them, what else travels along.

A folder is read as HF when it holds ``config.json`` and weights; without ``config.json`` it is
just a folder of weights. Weights are found in this order, as ``from_pretrained`` looks for them:
``model.safetensors.index.json``, ``model.safetensors``, any other ``*.safetensors``,
``pytorch_model.bin.index.json``, ``pytorch_model.bin``, other torch files (never Trainer state
such as ``training_args.bin`` or ``optimizer.pt``). Companion files (config, tokenizer, README,
sentence-transformers module files) are the folder's other top-level regular files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..jsonfile import parse_json, read_json_object

__all__ = ["FolderWeights", "find_weights", "read_index", "companion_files", "TOKENIZER_FILES", "is_weight_file"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
TRAINER_STATE = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "optimizer.bin"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.json", "chat_template.jinja",
)


@dataclass(frozen=True)
class FolderWeights:
    """The weight files of a folder: ``kind`` is "safetensors" or "torch"; ``index`` the index file if any."""

    kind: str
    files: tuple[Path, ...]
    index: Path | None


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or name.startswith("rng_state")


def find_weights(folder: Path) -> FolderWeights:
    """Locate a folder's weights (see module docstring); FormatError naming what was looked for."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return FolderWeights("safetensors", read_index(folder / SAFETENSORS_INDEX), folder / SAFETENSORS_INDEX)
    if (folder / "model.safetensors").is_file():
        return FolderWeights("safetensors", (folder / "model.safetensors",), None)
    shards = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    if shards:
        return FolderWeights("safetensors", tuple(shards), None)
    if (folder / TORCH_INDEX).is_file():
        return FolderWeights("torch", read_index(folder / TORCH_INDEX), folder / TORCH_INDEX)
    if (folder / "pytorch_model.bin").is_file():
        return FolderWeights("torch", (folder / "pytorch_model.bin",), None)
    torch_files = sorted(
        p
        for pattern in ("*.bin", "*.pt", "*.pth")
        for p in folder.glob(pattern)
        if p.is_file() and p.name not in TRAINER_STATE and not p.name.startswith((".", "rng_state")) and not _is_xser_info(p)
    )
    if torch_files:
        return FolderWeights("torch", tuple(torch_files), None)
    raise FormatError(
        f"{folder}: folder holds no weights (looked for {SAFETENSORS_INDEX}, model.safetensors, *.safetensors, "
        f"{TORCH_INDEX}, pytorch_model.bin, *.bin, *.pt, *.pth)"
    )


def _is_xser_info(path: Path) -> bool:
    """``P.info.pt`` beside an xser file ``P`` (whose tensors are in ``P.tensors/``) is metadata, not weights."""
    from .xser import tensor_folder

    return path.name.endswith(".info.pt") and tensor_folder(str(path)[: -len(".info.pt")]).is_dir()


def read_index(index_path: Path) -> tuple[Path, ...]:
    """The shard files an HF ``*.index.json`` names, in first-mention order, all checked to exist."""
    index = parse_json(index_path.read_bytes(), str(index_path), "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_path}: corrupted index: no 'weight_map' object mapping tensor names to files")
    files: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise FormatError(f"{index_path}: index names shard {name!r}, which is not a plain file name in the folder")
        shard = index_path.parent / name
        if not shard.is_file():
            raise FormatError(f"{index_path}: index names shard {name!r}, which is missing")
        files.append(shard)
    return tuple(files)


def companion_files(folder: Path) -> list[Path]:
    """Top-level regular, non-hidden, non-weight files: config, tokenizer, README and the like."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not is_weight_file(p.name)
    )


def read_config(path: Path) -> dict:
    """A JSON config file as a dict; FormatError naming the file when it is not a JSON object."""
    return read_json_object(path, "config")
