"""``save_checkpoint`` / ``load_checkpoint``: training state in NxD's layout, crash-safe, checksummed.

This module covers one process (no torch.distributed): the model is shard tp=0, pp=0 and the
optimizer DP rank 0. A tag is written into a staging folder next to it and renamed into place
only when every file, the manifest and ``done`` are durable, so a crash at any moment leaves
the previous checkpoints as they were, and a re-save of an existing tag replaces it atomically.

>>> shardwise.save_checkpoint("ckpts", "step_100", model=model, optimizer=opt, user_content={"step": 100})  # doctest: +SKIP
>>> shardwise.load_checkpoint("ckpts", model=model, optimizer=opt)  # newest complete tag  # doctest: +SKIP
{'step': 100}
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..atomic import atomic_output, fsync_dir, remove_stale_stages, write_text_durably
from ..errors import FormatError, IntegrityError, OptionError, UnsafeCheckpointError
from .files import check_file, save_object
from .layout import DONE, MANIFEST, MARKER, SCHEDULER, USER_CONTENT, manifest_document, model_file, optim_file
from .tags import Tag, list_tags, next_sequence, tags_to_remove

__all__ = ["save_checkpoint", "load_checkpoint", "ENCODINGS"]

ENCODINGS = ("pt",)


def _state_of(obj: Any) -> Any:
    return obj if isinstance(obj, dict) else obj.state_dict()


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    user_content: Any = None,
    num_kept_ckpts: int | None = None,
    encoding: str = "pt",
) -> str:
    """Save what is given under ``checkpoint_dir/tag`` and return the tag.

    ``model``, ``optimizer`` and ``scheduler`` are objects with ``state_dict()`` or plain dicts;
    ``user_content`` is any picklable object. ``tag`` defaults to ``checkpoint_<n>`` with ``n``
    the save's sequence number in this folder. ``num_kept_ckpts`` keeps that many complete
    checkpoints, newest by save order, and removes the others after this one is complete
    (``done`` first, so an interrupted removal never looks complete). Raises OptionError for
    bad arguments; any write error propagates and leaves earlier checkpoints untouched.
    """
    if encoding not in ENCODINGS:
        raise OptionError(f"encoding {encoding!r} is not supported here; choose {', '.join(ENCODINGS)}")
    if num_kept_ckpts is not None and num_kept_ckpts == 0:
        raise OptionError("num_kept_ckpts must be at least 1 (or None/-1 to keep everything)")
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    tags = list_tags(root)
    sequence = next_sequence(tags)
    tag = tag or f"checkpoint_{sequence}"
    if "/" in tag or tag in (".", "..") or tag.startswith("."):
        raise OptionError(f"tag {tag!r} must be a plain folder name")
    remove_stale_stages(root)  # tags whose save was killed
    parts = [(model_file(), model), (optim_file(), optimizer), (SCHEDULER, scheduler)]
    with atomic_output(root / tag, is_dir=True, overwrite=True) as stage:
        write_text_durably(stage / MARKER, "1")
        files = []
        for name, obj in parts:
            if obj is not None:
                size, crc = save_object(_state_of(obj), stage / name)
                files.append({"name": name, "size": size, "crc32": f"{crc:08x}"})
        if user_content is not None:
            size, crc = save_object(user_content, stage / USER_CONTENT)
            files.append({"name": USER_CONTENT, "size": size, "crc32": f"{crc:08x}"})
        for folder in {(stage / f["name"]).parent for f in files}:
            fsync_dir(folder)
        layout = {"tp": 1, "pp": 1, "dp": 1, "optimizer": "replicated"}
        write_text_durably(stage / MANIFEST, json.dumps(manifest_document(tag, sequence, encoding, layout, files), indent=1) + "\n")
        write_text_durably(stage / DONE, "1")
    for old in tags_to_remove(list_tags(root), num_kept_ckpts, tag):
        remove_tag(old)
    return tag


def remove_tag(tag: Tag) -> None:
    """Remove a checkpoint: ``done`` first (made durable), so an interruption leaves it incomplete, never half-valid."""
    done = tag.path / DONE
    if done.exists():
        done.unlink()
        fsync_dir(tag.path)
    shutil.rmtree(tag.path, ignore_errors=True)
    fsync_dir(tag.path.parent)


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    tag: str | None = None,
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    strict: bool = True,
    verify: bool = True,
    trust_pickle: bool = False,
) -> Any:
    """Load ``tag`` (default: the newest complete checkpoint) into the objects given; return the user content or None.

    Every file is checked against the manifest first (size and CRC-32; ``verify=False`` checks
    sizes only): a damaged file is an IntegrityError naming it, and with ``tag=None`` the newest
    complete checkpoint is never silently passed over for an older one. Files are unpickled with
    ``torch.load(weights_only=True)`` unless ``trust_pickle``: tensors, containers and numbers
    load, arbitrary classes in user content need the opt-in. ``model`` takes ``load_state_dict``
    (with ``strict``) or is a dict updated in place; ``optimizer`` and ``scheduler`` likewise.
    """
    root = Path(checkpoint_dir)
    chosen = _choose(root, tag)
    manifest = chosen.manifest
    listed = {f["name"]: f for f in manifest["files"]} if manifest else None
    if listed is not None:
        for entry in listed.values():
            check_file(chosen.path / entry["name"], entry["size"], int(entry["crc32"], 16) if verify else None)
    wanted = [(model_file(), model, strict), (optim_file(), optimizer, None), (SCHEDULER, scheduler, None)]
    for name, target, strictness in wanted:
        if target is None:
            continue
        path = chosen.path / name
        if not path.is_file():
            raise FormatError(f"{path}: missing; checkpoint {chosen.name} holds no {name.split('/')[0].replace('.pt', '')} state")
        _apply(target, _load(path, trust_pickle), strictness)
    user = chosen.path / USER_CONTENT
    return _load(user, trust_pickle) if user.is_file() else None


def _choose(root: Path, tag: str | None) -> Tag:
    tags = list_tags(root)
    if tag is not None:
        for t in tags:
            if t.name == tag:
                if not t.complete:
                    raise IntegrityError(f"{t.path}: checkpoint is incomplete (no done marker, or files shorter than its manifest says)")
                return t
        raise FormatError(f"{root / tag}: no such checkpoint")
    complete = [t for t in tags if t.complete]
    if not complete:
        raise FormatError(f"{root}: holds no complete checkpoint")
    for t in tags[tags.index(complete[-1]) + 1:]:
        if t.done:
            warnings.warn(f"{t.path}: marked done but its files do not match its manifest; loading {complete[-1].name} instead", stacklevel=3)
    return complete[-1]


def _load(path: Path, trust_pickle: bool) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise FormatError(f"{path}: cannot be unpickled ({e})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it pickles objects beyond tensors, containers and numbers "
            f"({str(e).splitlines()[0][:160]}); pass trust_pickle=True only if you trust where it came from"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise FormatError(f"{path}: not a readable torch file ({e})") from None


def _apply(target: Any, state: Any, strict: bool | None) -> None:
    if isinstance(target, dict):
        target.update(state)
    elif strict is not None:
        target.load_state_dict(state, strict=strict)
    else:
        target.load_state_dict(state)
