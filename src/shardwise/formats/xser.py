"""xser: torch-xla's one-file-per-tensor encoding of a torch checkpoint, as NxD reads and writes it.

A file ``P`` saved with xser is an ordinary torch pickle whose tensors are replaced by
``torch_xla.utils.serialization.TensorReference`` objects (attribute ``tid``). Tensor ``tid``
lives in ``P.tensors/tensor_<tid>.pt``, a torch file holding that one tensor; tids are the
tensors' positions in traversal order. NxD adds ``P.info.pt``:
``{tid: {"dtype": torch.dtype, "shape": torch.Size}}``, which its loader uses to allocate the
tensors that other ranks broadcast.

Reading (:func:`resolve_references`): every reference is replaced by the tensor file's tensor,
read lazily like any torch file (restricted unpickler, no data read); the info file, when
present, is checked against what the tensor files hold. Tensors stored inline in ``P`` (as stock
torch-xla leaves CPU tensors) are kept. Writing (:func:`xser_files`): the files for a flat state
dict, streamed tensor by tensor, loadable by torch-xla's ``xser.load`` and NxD's loader.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..errors import FormatError
from ..pickle_safety import LazyTensor, PickledObject, StructureError, _Walk, describe
from ..tensors import TensorInfo
from .torch_pickle import GlobalStub, ObjectStub, TensorStub, TorchPickle, read_torch_pickle, stub_pickle, write_torch_archive

__all__ = ["REFERENCE_CLASS", "XserPickle", "resolve_references", "tensor_folder", "info_file", "xser_files", "reference_stub", "info_table"]

REFERENCE_CLASS = "torch_xla.utils.serialization.TensorReference"
_MAX_TID = 10_000_000


def tensor_folder(path: str | os.PathLike) -> Path:
    """``P.tensors``: where the tensors of the xser file ``P`` are."""
    return Path(os.fspath(path) + ".tensors")


def info_file(path: str | os.PathLike) -> Path:
    """``P.info.pt``: NxD's table of each tid's dtype and shape."""
    return Path(os.fspath(path) + ".info.pt")


class XserPickle:
    """A reference file with its references resolved: ``root`` holds LazyTensors from the tensor files.

    ``stored(lazy, name)`` locates a tensor in whichever file holds it; ``tensors`` maps each tid
    to its parsed tensor file.
    """

    def __init__(self, reference: TorchPickle, root: Any, tensors: dict[int, TorchPickle]) -> None:
        self.reference = reference
        self.region = reference.region
        self.path = reference.path
        self.root = root
        self.tensors = tensors
        self._owners = {id(parsed.root): parsed for parsed in tensors.values()}

    def stored(self, lazy: LazyTensor, name: str):
        return self._owners.get(id(lazy), self.reference).stored(lazy, name)


def _tid(record: PickledObject, path: str) -> int:
    state = record.state
    if isinstance(state, tuple) and len(state) == 2:  # objects with __slots__ pickle (None, slots)
        state = state[1] if isinstance(state[1], dict) else state[0]
    tid = state.get("tid") if isinstance(state, dict) else None
    if type(tid) is not int or not 0 <= tid < _MAX_TID:
        raise FormatError(f"{path}: an xser TensorReference has no valid tid ({describe(tid)})")
    return tid


def resolve_references(parsed: TorchPickle, *, trust: bool = False) -> TorchPickle | XserPickle:
    """``parsed`` itself when it holds no TensorReference, else an :class:`XserPickle`.

    Raises FormatError naming the file when the tensor folder or a tensor file is missing, a
    tensor file holds something other than one tensor, or the info file disagrees with it.
    """
    if REFERENCE_CLASS not in parsed.globals_seen:
        return parsed  # no reference anywhere: nothing to walk
    path = parsed.path
    folder = tensor_folder(parsed.region.path)
    tensors: dict[int, TorchPickle] = {}
    found = False
    walk = _Walk()

    def load(tid: int) -> LazyTensor:
        if tid in tensors:  # one tensor referenced from two places
            return tensors[tid].root
        if parsed.region.start != 0 or parsed.region.label != parsed.region.path:
            raise FormatError(f"{path}: holds xser tensor references, which only work in a file with its .tensors folder beside it")
        file = folder / f"tensor_{tid}.pt"
        if not folder.is_dir():
            raise FormatError(f"{path}: is an xser file but its tensor folder {folder} is missing")
        if not file.is_file():
            raise FormatError(f"{file}: xser tensor file is missing (checkpoint incomplete)")
        tensor_file = read_torch_pickle(file, trust=trust)
        if not isinstance(tensor_file.root, LazyTensor):
            raise FormatError(f"{file}: an xser tensor file must hold one tensor, found {type(tensor_file.root).__name__}")
        tensor_file.stored(tensor_file.root, f"tensor_{tid}")  # checks its bytes are all there
        tensors[tid] = tensor_file
        return tensor_file.root

    def visit(value: Any) -> Any:
        nonlocal found
        if isinstance(value, PickledObject) and value.type_name == REFERENCE_CLASS:
            found = True
            return load(_tid(value, path))
        if not isinstance(value, (dict, list, tuple)):
            return value
        walk.enter(value)
        if isinstance(value, dict):
            for key in list(value):
                value[key] = visit(value[key])
            resolved = value
        elif isinstance(value, list):
            value[:] = [visit(item) for item in value]
            resolved = value
        else:
            resolved = tuple(visit(item) for item in value)
        walk.leave(value)
        return resolved

    try:
        root = visit(parsed.root)
    except StructureError as e:
        raise FormatError(f"{path}: {e}") from None
    except RecursionError:
        raise FormatError(f"{path}: the pickled structure nests too deeply to read safely") from None
    if not found:
        return parsed
    resolved = XserPickle(parsed, root, tensors)
    _check_info(resolved, trust)
    return resolved


def _check_info(resolved: XserPickle, trust: bool) -> None:
    """NxD's ``P.info.pt``, when present, must describe the tensor files as they are."""
    path = info_file(resolved.region.path)
    if not path.is_file():
        return
    table = read_torch_pickle(path, trust=trust).root
    if not isinstance(table, dict):
        raise FormatError(f"{path}: an xser info file must hold a dict of tid -> dtype and shape")
    for tid, entry in table.items():
        tensor_file = resolved.tensors.get(tid)
        if tensor_file is None or not isinstance(entry, dict):
            continue
        lazy = tensor_file.root
        dtype, shape = entry.get("dtype"), entry.get("shape")
        dtype_name = getattr(dtype, "name", None)
        if shape is not None and not isinstance(shape, (tuple, list)):
            raise FormatError(f"{path}: tid {tid} has shape {describe(shape)}, not a list of sizes")
        if (dtype_name is not None and dtype_name != lazy.dtype) or (shape is not None and tuple(shape) != lazy.shape):
            raise FormatError(
                f"{tensor_file.path}: holds {lazy.dtype} {list(lazy.shape)} but {path.name} records "
                f"{dtype_name if isinstance(dtype_name, str) else describe(dtype_name)} {describe(list(shape)) if shape is not None else None} "
                "(checkpoint corrupted or mixed)"
            )


# -- writing -----------------------------------------------------------------------------------
class _SizeStub:
    """Pickles as ``torch.Size(shape)``."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)

    def __reduce__(self):
        return (GlobalStub("torch", "Size"), (self.shape,))


def reference_stub(tid: int, info: TensorInfo) -> ObjectStub:
    """What stands for tensor ``tid`` in the reference file: a ``TensorReference`` with tid, shape and dtype."""
    return ObjectStub(GlobalStub(*REFERENCE_CLASS.rsplit(".", 1)), {"tid": tid, "shape": _SizeStub(info.shape), "dtype": GlobalStub("torch", info.dtype)})


def info_table(infos: list[TensorInfo]) -> dict:
    """NxD's ``.info.pt`` contents for tensors ``infos`` (tid = position): ``{tid: {"dtype", "shape"}}``, for :func:`stub_pickle`."""
    return {tid: {"dtype": GlobalStub("torch", info.dtype), "shape": _SizeStub(info.shape)} for tid, info in enumerate(infos)}


@dataclass(frozen=True)
class PlannedFile:
    """One file of an xser checkpoint: its path relative to the output, and how to write its bytes."""

    relpath: str
    produce: Callable[[BinaryIO], None]


def xser_files(relpath: str, infos: list[TensorInfo], write_tensor: Callable[[TensorInfo, BinaryIO], None]) -> list[PlannedFile]:
    """The files saving the flat state dict ``infos`` with xser at ``relpath``, in writing order.

    Tensor files first (``relpath.tensors/tensor_<i>.pt``, tid = position in ``infos``), then the
    reference file and NxD's info file. Each reference carries ``tid``, ``shape`` and ``dtype``:
    torch-xla's and NxD's loaders read ``tid``, and the variant whose ``TensorReference`` takes
    ``(tid, shape, dtype)`` checks the other two. ``write_tensor(info, sink)`` writes one tensor's bytes.
    """
    files = []
    for tid, info in enumerate(infos):
        name = f"tensor_{tid}"
        produce = (lambda sink, info=info, name=name: write_torch_archive(
            sink, name, stub_pickle(TensorStub("0", info)), [(info.nbytes, lambda out: write_tensor(info, out))]))
        files.append(PlannedFile(f"{relpath}.tensors/{name}.pt", produce))
    references = collections.OrderedDict((info.name, reference_stub(tid, info)) for tid, info in enumerate(infos))
    table = info_table(infos)
    stem = Path(relpath).name
    files.append(PlannedFile(relpath, lambda sink: write_torch_archive(sink, stem.rsplit(".", 1)[0], stub_pickle(references), [])))
    info_name = Path(info_file(relpath)).name
    files.append(PlannedFile(str(info_file(relpath)), lambda sink: write_torch_archive(sink, info_name.rsplit(".", 1)[0], stub_pickle(table), [])))
    return files
