"""How a training checkpoint's state objects become files, and back: ``pt``, ``safetensors``, ``xser``.

- ``pt``: one ``torch.save`` file, the payload NxD reads.
- ``safetensors``: the tensors in one safetensors file (``.safetensors`` in place of ``.pt``); the
  rest of the object (containers, numbers, strings, where each tensor goes) as JSON in the
  header's metadata under ``shardwise.structure``. A flat ``{name: tensor}`` dict keeps its names,
  so a model file is an ordinary safetensors state dict. Loading maps the file: no pickle at all.
- ``xser``: NxD's per-tensor files (:mod:`shardwise.formats.xser`): ``P`` holds the object with a
  ``TensorReference(tid, shape, dtype)`` for each tensor, ``P.tensors/tensor_<tid>.pt`` the
  tensors, ``P.info.pt`` their dtypes and shapes.

Scheduler and user content are always ``pt``, as NxD writes them.

A file that several DP ranks write together (replicated model and optimizer states, safetensors
or xser) is split by tensor: tensors in traversal order are spread over the ``parts`` by size
(:func:`.assign.spread`), part ``p`` writes its tensors, part 0 also what exists once (the
safetensors header; the xser reference and info files). Every part reports the byte ranges it
wrote with their CRC-32s; the leader folds them into one size and CRC per file
(:func:`fold_entries`), so the manifest looks the same however many ranks wrote a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..atomic import start_writeback
from ..checksum import crc32, crc32_combine
from ..dtypes import name_of
from ..errors import FormatError, IntegrityError, OptionError
from ..jsonfile import parse_json
from ..structure import UnstorableError, decode_structure, encode_structure
from ..tensors import TensorInfo, tensor_bytes
from .assign import replace_tensors, spread, tensors_in
from .files import save_object, write_durably, write_failure

__all__ = [
    "ENCODINGS", "stored_name", "write_part", "fold_entries", "read_state", "SPLIT_BY_TENSOR", "owned_tensors",
    "STRUCTURE_KEY", "write_tensor_file", "read_structured_safetensors", "state_name",
]

ENCODINGS = ("pt", "safetensors", "xser")
SPLIT_BY_TENSOR = ("safetensors", "xser")  # encodings whose shared files DP ranks write together
STRUCTURE_KEY = "shardwise.structure"  # the safetensors metadata key holding the object's structure (:mod:`shardwise.structure`)


def stored_name(name: str, encoding: str) -> str:
    """The file holding state ``name`` (``model/dp_rank_00_...pt``) in ``encoding``."""
    return name[: -len(".pt")] + ".safetensors" if encoding == "safetensors" and name.endswith(".pt") else name


def state_name(stored: str) -> str:
    """The inverse of :func:`stored_name` for every file an encoding writes for a state: ``X.safetensors``,
    xser's ``X.pt.tensors`` folder (its entries named by their folder) and ``X.pt.info.pt`` all give ``X.pt``."""
    from ..formats.xser import info_file, tensor_folder

    for suffix in (tensor_folder("").name, info_file("").name):  # ".tensors", ".info.pt"
        if stored.endswith(".pt" + suffix):
            return stored[: -len(suffix)]
    return stored[: -len(".safetensors")] + ".pt" if stored.endswith(".safetensors") else stored


def owned_tensors(obj: Any, part: int, parts: int) -> set[int]:
    """ids of the tensors of ``obj`` that part ``part`` of ``parts`` writes."""
    tensors = tensors_in(obj)
    owners = spread([t.numel() * t.element_size() for t in tensors], parts)
    return {id(t) for t, owner in zip(tensors, owners) if owner == part}


def _data(tensor, where: str):
    """The bytes of a tensor this part writes (refusing a meta placeholder: that would be a planning bug)."""
    if tensor.device.type == "meta":
        raise IntegrityError(f"{where}: this rank was to write a tensor it holds no data for (a meta placeholder)")
    return tensor.detach().cpu().contiguous()


def _info(name: str, tensor) -> TensorInfo:
    return TensorInfo(name, tuple(tensor.shape), name_of(tensor.dtype))


def whole_entry(entry_name: str, size: int, crc: int) -> dict:
    """A manifest entry of a file written whole: one byte range, its CRC-32."""
    return {"name": entry_name, "size": size, "ranges": [[0, size, crc]]}


def _tensor_names(obj: Any, tensors: list) -> dict[int, str]:
    """id(tensor) -> its name in the file: the key of a flat ``{str: tensor}`` dict, else its position."""
    ids = {id(t) for t in tensors}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and all(id(v) in ids for v in obj.values()):
        names = {}
        for key, value in obj.items():
            names.setdefault(id(value), key)
        return names
    return {id(t): f"tensor_{i}" for i, t in enumerate(tensors)}


# -- writing ------------------------------------------------------------------------------------
def write_part(encoding: str, obj: Any, stage: Path, name: str, part: int = 0, parts: int = 1) -> list[dict]:
    """Write part ``part`` of ``parts`` of state ``name`` into the staging folder ``stage``.

    Returns manifest entries with byte ranges: ``{"name", "size", "ranges": [[offset, length, crc32], ...]}``
    (``size`` is the whole file's, known to every part). ``obj``'s tensors that other parts write
    may be ``meta`` tensors: only their shapes and dtypes are used.
    """
    if encoding == "pt":
        size, crc = save_object(obj, stage / name)
        return [whole_entry(name, size, crc)]
    if encoding == "safetensors":
        return [_write_safetensors(obj, stage, stored_name(name, encoding), part, parts)]
    if encoding == "xser":
        return _write_xser(obj, stage, name, part, parts)
    raise OptionError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")


def _write_safetensors(obj: Any, stage: Path, name: str, part: int, parts: int) -> dict:
    tensors = tensors_in(obj)
    names = _tensor_names(obj, tensors)
    try:
        skeleton = encode_structure(obj, lambda t, _path: names[id(t)])
    except UnstorableError as e:
        raise OptionError(f"encoding='safetensors' stores tensors, numbers, strings and containers; {e}; save with encoding='pt'") from None
    return write_tensor_file(
        stage / name, name, {names[id(t)]: t for t in tensors}, {STRUCTURE_KEY: json.dumps(skeleton, separators=(",", ":"))},
        mine=owned_tensors(obj, part, parts), header=part == 0,
    )


def write_tensor_file(path: Path, name: str, tensors: dict[str, Any], metadata: dict[str, str], mine: set[int] | None = None, header: bool = True) -> dict:
    """Write the safetensors file ``path`` (``name`` in the manifest) holding ``tensors`` with ``metadata``, fsynced.

    Several writers may fill one file together: each writes the tensors whose ids are in ``mine``
    (all when None) and one of them the ``header``; every writer sizes the file alike, so none cuts
    another's bytes. Tensors this writer does not write may be ``meta`` tensors. Returns the
    manifest entry with the byte ranges written and their CRC-32s (see :func:`write_part`); a
    failed write raises OSError naming the file.
    """
    from ..formats.safetensors import check_writable, header_bytes

    infos = [_info(tensor_name, t) for tensor_name, t in tensors.items()]
    check_writable(infos)
    head, ordered = header_bytes(infos, metadata)
    size = len(head) + sum(info.nbytes for info in ordered)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranges = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # never truncated: other parts write the same file
    try:
        os.ftruncate(fd, size)  # every part sets the same size, so no part cuts another's bytes
        if header:
            _pwrite(fd, head, 0)
            ranges.append([0, len(head), crc32(head)])
        offset = len(head)
        for info in ordered:
            tensor = tensors[info.name]
            if mine is None or id(tensor) in mine:
                data = tensor_bytes(_data(tensor, str(path))) if info.nbytes else b""
                if data:
                    _pwrite(fd, data, offset)
                    start_writeback(fd, offset, info.nbytes)
                ranges.append([offset, info.nbytes, crc32(data)])
            offset += info.nbytes
        os.fsync(fd)
    except OSError as e:
        raise write_failure(path, e) from None
    finally:
        os.close(fd)
    return {"name": name, "size": size, "ranges": ranges}


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_xser(obj: Any, stage: Path, name: str, part: int, parts: int) -> list[dict]:
    from ..formats.torch_pickle import stub_pickle, write_torch_archive
    from ..formats.xser import info_file, info_table, reference_stub, tensor_folder

    tensors = tensors_in(obj)
    tids = {id(t): tid for tid, t in enumerate(tensors)}
    infos = [_info(f"tensor_{tid}", t) for tid, t in enumerate(tensors)]
    mine = owned_tensors(obj, part, parts)
    entries = []
    for tid, tensor in enumerate(tensors):
        if id(tensor) in mine:
            own = _data(tensor, str(stage / name))
            if own.untyped_storage().nbytes() != own.numel() * own.element_size():
                own = own.clone()  # torch.save writes a view's whole storage
            relpath = f"{Path(name).parent}/{tensor_folder(Path(name).name).name}/tensor_{tid}.pt"
            size, crc = save_object(own, stage / relpath)
            entries.append(whole_entry(relpath, size, crc))
    if part == 0:
        references = replace_tensors(obj, lambda t: reference_stub(tids[id(t)], infos[tids[id(t)]]))
        for relpath, payload in ((name, references), (str(info_file(name)), info_table(infos))):
            data = stub_pickle(payload)
            stem = Path(relpath).name.rsplit(".", 1)[0]
            size, crc = _save_with(lambda sink, stem=stem, data=data: write_torch_archive(sink, stem, data, []), stage / relpath)
            entries.append(whole_entry(relpath, size, crc))
    return entries


def _save_with(produce: Callable, path: Path) -> tuple[int, int]:
    """Write a small file through ``produce(sink)``, fsynced; (size, CRC-32)."""
    import io

    buffer = io.BytesIO()
    produce(buffer)
    return write_durably(path, buffer.getvalue())


def fold_entries(entries: list[dict]) -> list[dict]:
    """Manifest entries ``{"name", "size", "crc32"}`` from every part's ranged entries (see :func:`write_part`).

    Raises IntegrityError when the parts' ranges of a file do not cover it exactly once.
    """
    by_name: dict[str, dict] = {}
    for entry in entries:
        folded = by_name.setdefault(entry["name"], {"size": entry["size"], "ranges": []})
        folded["ranges"] += entry["ranges"]
    out = []
    for name, folded in sorted(by_name.items()):
        crc, position = 0, 0
        for offset, length, part_crc in sorted(folded["ranges"]):
            if offset != position:
                raise IntegrityError(f"{name}: the ranks' writes end at byte {position} but the next starts at {offset} (bytes uncovered or written twice)")
            crc = crc32_combine(crc, part_crc, length)
            position += length
        if position != folded["size"]:
            raise IntegrityError(f"{name}: the ranks wrote {position} of its {folded['size']} bytes")
        out.append({"name": name, "size": folded["size"], "crc32": f"{crc:08x}"})
    return out


# -- reading ------------------------------------------------------------------------------------
def read_state(encoding: str, folder: Path, name: str, load: Callable[[str], Any], trust_pickle: bool, mapped: bool) -> Any:
    """State ``name`` of the tag in ``folder`` stored in ``encoding``.

    ``load(relpath)`` is the checked loader of one torch file (manifest size and CRC, then
    :func:`.files.torch_load`); safetensors files are checked by the caller before this reads them.
    """
    if encoding == "pt":
        return load(name)
    if encoding == "safetensors":
        return read_structured_safetensors(folder / stored_name(name, encoding), mapped)
    if encoding == "xser":
        return _read_xser(folder, name, load)
    raise FormatError(f"{folder}: its manifest names an unknown encoding {encoding!r}")


def read_structured_safetensors(path: Path, mapped: bool, other: Callable | None = None) -> Any:
    """The object a safetensors file written with a :data:`STRUCTURE_KEY` describes, its tensors read
    (``mapped``: private maps of the file) or copied; a tensor named twice loads as one tensor.
    ``other`` decodes extra node kinds (:func:`shardwise.structure.decode_structure`). No pickle
    is involved; FormatError naming ``path`` for anything malformed."""
    from ..formats.safetensors import SafetensorsFile

    with SafetensorsFile(path) as source:
        structure = source.metadata.get(STRUCTURE_KEY)
        if structure is None:
            raise FormatError(f"{path}: no {STRUCTURE_KEY} in its metadata: not a state shardwise wrote")
        loaded: dict[str, Any] = {}

        def tensor(tensor_name: str):
            if not isinstance(tensor_name, str) or tensor_name not in source:
                raise FormatError(f"{path}: its structure names a tensor {tensor_name!r} the file does not hold")
            if tensor_name not in loaded:
                loaded[tensor_name] = source.map(tensor_name) if mapped else source.read(tensor_name)
            return loaded[tensor_name]

        try:
            return decode_structure(parse_json(structure, str(path), f"its {STRUCTURE_KEY} metadata"), tensor, str(path), other=other)
        except FormatError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
            raise FormatError(f"{path}: its {STRUCTURE_KEY} metadata is not a structure shardwise wrote ({type(e).__name__}: {e})") from None


def _read_xser(folder: Path, name: str, load: Callable[[str], Any]) -> Any:
    import torch

    from ..formats.xser import REFERENCE_CLASS, tensor_folder

    class TensorReference:  # stands for torch_xla's class: weights_only admits it by its full name
        pass

    TensorReference.__module__, _, TensorReference.__qualname__ = REFERENCE_CLASS.rpartition(".")
    with torch.serialization.safe_globals([TensorReference]):
        references = load(name)
    tensors_dir = f"{Path(name).parent}/{tensor_folder(Path(name).name).name}"

    loaded: dict[int, Any] = {}  # a tid referenced twice (tied weights) is read once and stays one tensor

    def resolve(ref):
        tid = getattr(ref, "tid", None)
        if not isinstance(tid, int) or tid < 0:
            raise FormatError(f"{folder / name}: a TensorReference without a valid tid ({tid!r})")
        if tid not in loaded:
            loaded[tid] = load(f"{tensors_dir}/tensor_{tid}.pt")
        tensor = loaded[tid]
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(f"{folder / tensors_dir}/tensor_{tid}.pt: holds a {type(tensor).__name__}, not a tensor")
        shape, dtype = getattr(ref, "shape", None), getattr(ref, "dtype", None)
        if (shape is not None and tuple(shape) != tuple(tensor.shape)) or (dtype is not None and dtype != tensor.dtype):
            raise FormatError(f"{folder / tensors_dir}/tensor_{tid}.pt: holds {tuple(tensor.shape)} {tensor.dtype}, its reference says {tuple(shape)} {dtype}")
        return tensor

    def walk(obj):
        if isinstance(obj, TensorReference):
            return resolve(obj)
        if isinstance(obj, dict):
            for key, value in obj.items():
                obj[key] = walk(value)
            return obj
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(walk(v) for v in obj)
        return obj

    try:
        return walk(references)
    except (ValueError, TypeError, RecursionError) as e:
        raise FormatError(f"{folder / name}: its references cannot be resolved ({type(e).__name__}: {str(e)[:120]})") from None
