"""Resharding model weights on load: one rank's model state at this run's TP/PP, from a tag saved at another.

A training tag's ``model/`` folder is NxD's sharded container (``dp_rank_00_tp_rank_TT_pp_rank_PP.pt``),
the one the layout engine reads and writes. :func:`resharded_model_state` opens it as
:func:`~shardwise.reshard.model.open_model` opens a folder written by NxD (style, Q/K/V
arrangement, KV replication and vocabulary padding read from names and shapes, head counts from
the HF config), plans the target layout exactly as ``shardwise reshard --tp N --pp M`` does, and
executes only this rank's part of the plan into memory: no offline step, no file written, no
other rank's output built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, IntegrityError, LayoutError, OptionError
from .layout import MANIFEST, manifest_entries

if TYPE_CHECKING:
    import torch

__all__ = ["resharded_model_state", "RESHARDABLE_STYLES"]

RESHARDABLE_STYLES = ("nxdt", "megatron")  # what the layout engine reads and writes in NxD's model/ folders
_ADVICE = "resharding on load works for the architectures the layout engine knows (Llama family); otherwise load at the saved TP/PP"


def resharded_model_state(
    tag_path: str | os.PathLike,
    *,
    tp_size: int,
    pp_size: int,
    tp_rank: int,
    pp_rank: int,
    config: dict | str | os.PathLike | None = None,
    trust_pickle: bool = False,
) -> dict[str, "torch.Tensor"]:
    """The model state dict rank (tp_rank, pp_rank) of a tp_size x pp_size run holds, built from the
    model shards of a training checkpoint tag saved at another TP/PP, through the layout engine.

    Every rank calls it for itself, independently (not a collective). The result has the keys,
    order, shapes and dtypes of the file ``model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt`` that
    ``shardwise reshard --tp tp_size --pp pp_size`` would write (same style and Q/K/V option; KV heads replicated when TP exceeds them in the
    nxdt style with qkv_proj, as reshard does). Only the source rows this rank needs are read,
    through maps of the files; memory is this rank's output plus a few 16 MiB chunks (plus one
    source tensor at a time when it is stored strided, as NxD stores o_proj). Optimizer files
    are not read, and nothing is written.

    ``config`` is the model's HF config (a dict, a config.json, or a folder holding one);
    None takes ``model_config`` from the tag's ``shardwise.json``. Model files listed in the
    manifest are checked for size (not CRC-32: that would read every byte of every shard).
    Raises LayoutError (TP that does not divide the heads, ranks out of range, a model the
    Llama tables do not know), OptionError (no config), FormatError or IntegrityError (damaged
    files), each one line naming the folder and the numbers.

    >>> state = resharded_model_state("ckpts/step_100", tp_size=4, pp_size=1, tp_rank=2, pp_rank=0)  # doctest: +SKIP
    >>> model.load_state_dict(state)  # doctest: +SKIP
    """
    from ..jsonfile import read_json_object
    from ..reshard.containers import find_shards

    tag_path = Path(tag_path)
    _check_ranks(tag_path, tp_size, pp_size, tp_rank, pp_rank)
    folder = tag_path / "model"
    if not folder.is_dir():
        raise FormatError(f"{folder}: missing; the checkpoint holds no model shards to reshard")
    manifest = read_json_object(tag_path / MANIFEST, "manifest") if (tag_path / MANIFEST).is_file() else None
    hf_config = _model_config(tag_path, config, manifest)
    _check_sizes(tag_path, manifest)  # before opening: a truncated file is named as such, not as an unreadable zip
    shards = find_shards(folder, trust_pickle=trust_pickle)
    if shards is None or shards.container != "nxdt":
        if shards is not None:
            shards.close()
        raise FormatError(f"{folder}: holds no model shards named dp_rank_00_tp_rank_TT_pp_rank_PP.pt")
    try:
        _check_listed(tag_path, shards, manifest)
        _check_architecture(folder, shards, hf_config)
    except BaseException:
        shards.close()
        raise
    saved = f"saved at tp {shards.tp} x pp {shards.pp}"
    return _build(tag_path, shards, hf_config, saved, tp_size, pp_size, tp_rank, pp_rank)


def _build(tag_path: Path, shards, hf_config, saved: str, tp_size: int, pp_size: int, tp_rank: int, pp_rank: int) -> dict:
    from ..layout.sharding import shard_plan
    from ..layout.stream import TileStreamer, read_tiled
    from ..layout.tiles import compose
    from ..reshard.convert import target_layout
    from ..reshard.model import open_shards

    try:
        source = open_shards(shards, config=hf_config)
    except LayoutError as e:
        raise LayoutError(f"{e}; {_ADVICE}") from None
    with source:
        try:
            layout = target_layout(
                source, "nxdt", style=None, tp=tp_size, pp=pp_size, qkv_linear=None, fuse_qkv=None, kv_multiplier=None, keep=True,
            )
            mine = shard_plan(source.dims, source.canonical, layout)[(tp_rank, pp_rank)]
        except (LayoutError, OptionError) as e:
            raise LayoutError(f"{tag_path}: {saved}, cannot be resharded to tp {tp_size} x pp {pp_size}: {e}") from None
        tensors = compose({(tp_rank, pp_rank): mine}, source.inverse())[(tp_rank, pp_rank)]
        streamer = TileStreamer(source.lookup)
        return {t.info.name: read_tiled(streamer, t) for t in tensors}


def _check_ranks(tag_path: Path, tp_size: int, pp_size: int, tp_rank: int, pp_rank: int) -> None:
    for name, value in (("tp_size", tp_size), ("pp_size", pp_size), ("tp_rank", tp_rank), ("pp_rank", pp_rank)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise OptionError(f"{tag_path}: {name} must be an integer, not {value!r}")
    for rank_name, rank, size_name, size in (("tp_rank", tp_rank, "tp_size", tp_size), ("pp_rank", pp_rank, "pp_size", pp_size)):
        if size < 1:
            raise LayoutError(f"{tag_path}: {size_name} must be at least 1, not {size}")
        if not 0 <= rank < size:
            raise LayoutError(f"{tag_path}: {rank_name} {rank} is out of range for {size_name} {size} (ranks 0..{size - 1})")


def _model_config(tag_path: Path, config, manifest: dict | None) -> dict | None:
    """The HF config dict: ``config`` (dict, file or folder), else the manifest's ``model_config``.

    None only when the folder carries the config itself (a ``parallel`` manifest written by the
    layout engine), which the engine then reads.
    """
    from ..formats.hf import read_config

    if isinstance(config, dict):
        return config
    if config is not None:
        path = Path(config)
        return read_config(path / "config.json" if path.is_dir() else path)
    stored = (manifest or {}).get("model_config")
    if stored is not None:
        if not isinstance(stored, dict):
            raise FormatError(f"{tag_path / MANIFEST}: model_config is not a JSON object (an HF config.json) but {type(stored).__name__}")
        return stored
    parallel = (manifest or {}).get("parallel")
    if isinstance(parallel, dict) and isinstance(parallel.get("config"), dict):
        return None
    raise OptionError(
        f"{tag_path}: resharding the model on load needs the model's HF config (head counts cannot be read from shapes) "
        f"and the checkpoint records none; pass model_config= (a config.json or its dict)"
    )


def _check_sizes(tag_path: Path, manifest: dict | None) -> None:
    """Each model file the training manifest lists against its size (a stat; the CRC-32 would read every byte)."""
    from .files import check_file

    for name, entry in manifest_entries(manifest).items():
        if name.startswith("model/"):
            check_file(tag_path / name, entry, verify=False)


def _check_listed(tag_path: Path, shards, manifest: dict | None) -> None:
    """With a training manifest, every model shard read must be one it lists (a stray file is not part of the tag)."""
    if not isinstance((manifest or {}).get("files"), list):
        return
    entries = manifest_entries(manifest)
    for file in shards.files.values():
        path = Path(file)
        if path.relative_to(tag_path).as_posix() not in entries:
            raise IntegrityError(f"{path}: not listed in the checkpoint's manifest")


def _check_architecture(folder: Path, shards, hf_config: dict | None) -> None:
    """A one-line LayoutError unless the shards hold a model the layout engine's tables know."""
    from ..models.llama import MODEL_TYPES
    from ..reshard.model import detect_style

    model_type = (hf_config or {}).get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise LayoutError(f"{folder}: the model config says model_type {model_type!r}; {_ADVICE}")
    names = shards.sources[(0, 0)].keys()
    try:
        style = detect_style(names)[0]
    except LayoutError:
        example = f" (e.g. {names[0]})" if names else ""
        raise LayoutError(f"{folder}: tensor names{example} match none of the Llama layouts; {_ADVICE}") from None
    if style not in RESHARDABLE_STYLES:
        raise LayoutError(f"{folder}: holds {style}-style tensor names, not NxD's {' or '.join(RESHARDABLE_STYLES)} styles; {_ADVICE}")
