"""A Lightning checkpoint as a shardwise folder: what is on disk, how it is written and read back.

At the path Lightning names (``.../epoch=0-step=10.ckpt``) appears a folder::

    checkpoint.safetensors   every tensor of the checkpoint dict, named by where it sits
                             (``state_dict.layer.weight``, ``optimizer_states.0.state.0.exp_avg``),
                             and the rest of the dict as JSON in its metadata (``shardwise.structure``)
    pickled.pt               only when some value has no safe form (:mod:`.values`): those values,
                             pickled; loading them needs trust_pickle
    shardwise.json           manifest, written last: format, version, every file's size and CRC-32,
                             where each pickled value sits and its type

The folder is written under a hidden staging name next to the path, every file fsynced, and
renamed into place (replacing what was there atomically), so the path holds a complete checkpoint
or nothing new. Reading checks every file against the manifest before using it and returns the
dict that was saved: same keys in the same order, same container types (OrderedDict with its
``_metadata``, tuples, int keys), same tensors bit for bit (tensors that were one object stay one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_output, remove_stale_stages, write_text_durably
from ..errors import FormatError, UnsafeCheckpointError
from ..jsonfile import document_bytes, read_json_object
from ..structure import encode_structure
from ..training.encodings import STRUCTURE_KEY, fold_entries, read_structured_safetensors, whole_entry, write_tensor_file
from ..training.files import check_file, torch_load, write_durably
from ..training.layout import MANIFEST, checked_file_entries
from .values import ValueCodec

__all__ = ["FORMAT", "PAYLOAD", "PICKLED", "Snapshot", "snapshot_checkpoint", "write_folder", "read_folder", "is_shardwise_folder", "is_lightning_folder"]

FORMAT = "shardwise-lightning-checkpoint"
VERSION = 1
PAYLOAD = "checkpoint.safetensors"
PICKLED = "pickled.pt"


@dataclass
class Snapshot:
    """A checkpoint dict made ready to write: its structure (JSON text), its tensors by name, and the
    bytes of its pickled values (None when every value had a safe form)."""

    structure: str
    tensors: dict[str, Any]
    pickled: bytes | None
    pickled_index: list[dict]


class _TensorNames:
    """Names tensors by where they sit (``optimizer_states.0.state.0.exp_avg``), each tensor once, names unique."""

    def __init__(self) -> None:
        self.by_id: dict[int, str] = {}
        self.tensors: dict[str, Any] = {}

    def __call__(self, tensor: Any, path: tuple) -> str:
        if id(tensor) not in self.by_id:
            base = ".".join(map(str, path)) or "tensor"
            name, n = base, 1
            while name in self.tensors or name == "__metadata__":  # keys with dots can meet; safetensors reserves __metadata__
                n += 1
                name = f"{base}#{n}"
            self.by_id[id(tensor)] = name
            self.tensors[name] = tensor
        return self.by_id[id(tensor)]


def snapshot_checkpoint(checkpoint: dict, copy: Callable[[Any], Any] | None = None) -> Snapshot:
    """Everything :func:`write_folder` needs, taken now: the structure is encoded and unsafe values
    pickled on the caller's thread; tensors are referenced, or ``copy(tensor)`` (CPU copies for a
    background write). OptionError naming the value that can be neither stored nor pickled."""
    names = _TensorNames()
    codec = ValueCodec()
    node = encode_structure(checkpoint, names, other=codec.encode, root="the checkpoint")
    pickled = codec.pickled_bytes()  # before any copy: a value that cannot be pickled fails with no buffer taken
    tensors = names.tensors if copy is None else {name: copy(t) for name, t in names.tensors.items()}
    return Snapshot(json.dumps(node, separators=(",", ":")), tensors, pickled, codec.pickled_index)


def write_folder(snap: Snapshot, path: Path) -> None:
    """Write ``snap`` as the checkpoint folder ``path``, atomically, replacing what is there (the
    caller has checked that it may: :func:`shardwise.lightning.paths.check_replaceable`).

    Staging folders that killed processes left next to ``path`` are removed first. A failure
    leaves ``path`` as it was and raises OSError naming the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(path.parent)
    with atomic_output(path, is_dir=True, overwrite=True, any_kind=True) as stage:
        entries = [write_tensor_file(stage / PAYLOAD, PAYLOAD, snap.tensors, {STRUCTURE_KEY: snap.structure})]
        if snap.pickled is not None:
            entries.append(whole_entry(PICKLED, *write_durably(stage / PICKLED, snap.pickled)))
        write_text_durably(stage / MANIFEST, document_bytes(_manifest(fold_entries(entries), snap.pickled_index)))


def _manifest(files: list[dict], pickled: list[dict]) -> dict:
    from .. import __version__

    return {"format": FORMAT, "version": VERSION, "created_by": f"shardwise {__version__}", "files": files, "pickled": pickled}


def is_shardwise_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding a shardwise manifest (of any format: checked on read)."""
    return path.is_dir() and (path / MANIFEST).is_file()


def is_lightning_folder(path: Path) -> bool:
    """True when ``path`` is a Lightning checkpoint folder this module wrote (what a save may replace
    and ``remove_checkpoint`` may delete; training tags and archives hold a manifest too)."""
    if not is_shardwise_folder(path):
        return False
    try:
        return read_json_object(path / MANIFEST, "the checkpoint's manifest").get("format") == FORMAT
    except FormatError:
        return False


def read_folder(path: Path, *, trust_pickle: bool = False, verify: bool = True) -> dict:
    """The checkpoint dict saved in the folder ``path`` (tensors on CPU, independent of the files).

    Every file is checked against the manifest first (size, and CRC-32 unless ``verify`` is
    false): IntegrityError naming the damaged file. Pickled values load only with
    ``trust_pickle``; otherwise UnsafeCheckpointError naming the pickle file and what it holds,
    before anything is unpickled. FormatError for a manifest or payload shardwise did not write.
    """
    manifest = read_json_object(path / MANIFEST, "the checkpoint's manifest")
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{path / MANIFEST}: format {manifest.get('format')!r}, not a Lightning checkpoint shardwise wrote ({FORMAT!r})")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise FormatError(f"{path / MANIFEST}: version {manifest.get('version')!r}; this shardwise reads version {VERSION} and older: upgrade it")
    entries = checked_file_entries(manifest, path / MANIFEST)
    if PAYLOAD not in entries:
        raise FormatError(f"{path / MANIFEST}: lists no {PAYLOAD}")
    for name, entry in entries.items():
        check_file(path / name, entry, verify)
    pickled = manifest.get("pickled") if isinstance(manifest.get("pickled"), list) else []
    if (pickled or PICKLED in entries) and not trust_pickle:  # the file decides, not the manifest's description of it
        raise UnsafeCheckpointError(_refusal(path / PICKLED, pickled))
    loaded: list = []

    def load_pickled() -> list:
        if not trust_pickle:
            raise UnsafeCheckpointError(_refusal(path / PICKLED, pickled))
        if not loaded:
            if PICKLED not in entries:
                raise FormatError(f"{path / MANIFEST}: the structure refers to pickled values but lists no {PICKLED}")
            values = torch_load(path / PICKLED, trust_pickle=True)
            if not isinstance(values, list):
                raise FormatError(f"{path / PICKLED}: holds a {type(values).__name__}, not the list of pickled values")
            loaded.append(values)
        return loaded[0]

    codec = ValueCodec(str(path / PAYLOAD), pickled=load_pickled)
    checkpoint = read_structured_safetensors(path / PAYLOAD, mapped=False, other=codec.decode)
    if not isinstance(checkpoint, dict):
        raise FormatError(f"{path / PAYLOAD}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _refusal(file: Path, pickled: list) -> str:
    listed = "; ".join(f"{p.get('at')}: {p.get('type')}" for p in pickled[:3] if isinstance(p, dict))
    more = f" and {len(pickled) - 3} more" if len(pickled) > 3 else ""
    what = f"{len(pickled)} value(s) of this checkpoint have no safe form and were pickled ({listed}{more})" if pickled else "this checkpoint holds pickled values"
    return (
        f"{file}: refused to load: {what}; nothing was unpickled; pass trust_pickle=True (ShardwiseCheckpointIO(trust_pickle=True), "
        f"or weights_only=False) only if you trust where the checkpoint came from"
    )

