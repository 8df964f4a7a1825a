"""PyTorch distributed checkpoints (DCP), read lazily: a folder of ``.metadata`` and ``__R_N.distcp`` files.

``torch.distributed.checkpoint.save`` (and Lightning's ModelParallelStrategy through it) writes:

- ``.metadata``: a pickled ``Metadata``: for every flattened key (``fqn``) either the tensor's
  global shape, dtype and the chunks it was saved in (offsets and sizes in the global tensor,
  one per shard; a replicated tensor is one chunk), or a byte object; ``storage_data`` maps each
  chunk to (file, byte offset, length); ``planner_data`` maps each fqn to the key path it was
  flattened from (``("model", "layers.0.weight")``);
- ``__R_N.distcp``: rank R's N-th data file, the concatenation of one ``torch.save`` zip per chunk.

Here ``.metadata`` is read with an unpickler that admits DCP's own metadata classes (as inert
records), ``torch.Size``, torch dtypes and plain containers, and nothing else: no code from the
file runs. A chunk's zip is parsed only when the chunk is used, and only its header; tensor bytes
are then read in place. A tensor saved whole (one chunk) is a plain stored tensor; a sharded one
is a :class:`~shardwise.layout.tiles.TiledTensor` whose tiles are its chunks, so conversions
stream it through :class:`~shardwise.layout.stream.TileStreamer` a band of rows at a time and
never hold a whole tensor, let alone the model.

Which tensors are weights follows :mod:`.lightning`'s rule on the key paths: a top-level
``state_dict`` (Lightning), else ``model`` or ``module``, else everything; the rest (optimizer
states, byte objects) is training state. ``all_tensors=True`` takes every tensor under its
flattened key instead (Megatron's ``torch_dist`` checkpoints save a flat dict of global keys,
often with no planner data to tell the key paths by). :func:`read_state` reads it all back
instead, as the nested dict that was saved, every tensor whole (what resuming training from a
DCP needs).

The files need not be a folder: :class:`DcpFiles` also describes them as byte regions of a larger
file (``model_weights/`` inside an uncompressed ``.nemo`` tar), read in place the same way.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from .. import dtypes
from ..errors import FormatError, UnsafeCheckpointError
from ..pickle_safety import DTypeRef, LazyTensor, RestrictedUnpickler, describe, path_from_parts, torch_size
from ..layout.stream import TiledSource
from ..tensors import FileTensorSource, StoredTensor, TensorInfo
from .lightning import WEIGHT_KEYS
from .region import Region, open_region

__all__ = ["METADATA", "looks_like_dcp", "read_metadata", "read_state", "DcpFiles", "DcpMetadata", "DcpTensor", "DcpChunk", "DcpSource", "chunk_tiles"]

METADATA = ".metadata"
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
_RECORDS = {
    (_METADATA_MODULE, name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {(_FILESYSTEM_MODULE, "_StorageInfo")}
_MAX_METADATA_BYTES = 1 << 30


@dataclass(frozen=True)
class DcpFiles:
    """Where the files of one DCP checkpoint are: a folder, or regions of a larger file.

    ``label`` names the checkpoint in messages (the folder, or ``archive.nemo:model_weights``);
    ``regions`` maps each plain file name to its bytes, or is None for the files of folder ``label``.

    >>> DcpFiles.folder("ckpt").region(".metadata")  # doctest: +SKIP
    Region(path='ckpt/.metadata', start=0, size=1234, label='ckpt/.metadata')
    """

    label: str
    regions: dict[str, Region] | None = None

    @staticmethod
    def folder(path: str | os.PathLike) -> "DcpFiles":
        return DcpFiles(os.fspath(path))

    def path(self, name: str) -> str:
        """How messages name file ``name``."""
        return os.path.join(self.label, name) if self.regions is None else f"{self.label}/{name}"

    def region(self, name: str) -> Region | None:
        """The bytes of file ``name`` (None when there is no such file)."""
        if self.regions is not None:
            return self.regions.get(name)
        path = self.path(name)
        return Region.whole_file(path) if os.path.isfile(path) else None


def as_files(where: "str | os.PathLike | DcpFiles") -> DcpFiles:
    return where if isinstance(where, DcpFiles) else DcpFiles.folder(where)


@dataclass(frozen=True)
class DcpChunk:
    """One saved piece of a tensor: its place in the global tensor and where its ``torch.save`` zip is."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the checkpoint folder: a plain file name
    offset: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """A tensor entry of the metadata: flattened key, key path, global shape and dtype, chunks."""

    fqn: str
    path: tuple
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[DcpChunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class DcpMetadata:
    """What ``.metadata`` says, checked: tensors and byte objects by fqn, and the DCP version.

    ``paths`` is ``planner_data``: every entry's key path in the dict that was saved, as torch's
    ``flatten_state_dict`` recorded it (strings for dict keys, integers for list indices), in the
    order the entries were flattened; None when the save did not flatten (each fqn is then a
    top-level key of its own).
    """

    files: DcpFiles
    tensors: dict[str, DcpTensor]
    objects: dict[str, DcpChunk]
    version: str | None
    paths: dict[str, tuple] | None = None

    @property
    def folder(self) -> Path:
        return Path(self.files.label)


def looks_like_dcp(folder: Path) -> bool:
    """A folder holding ``.metadata`` (what ``torch.distributed.checkpoint`` reads first)."""
    return (folder / METADATA).is_file()


# -- the restricted unpickler ----------------------------------------------------------------------
def _record_class(qualname: str) -> type:
    """An inert, hashable stand-in (``MetadataIndex`` objects are dict keys) recording args and state."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args) after __new__: nothing more to do
        pass

    def __setstate__(self, state):
        self.state = state

    return type(qualname.rsplit(".", 1)[-1], (), {"__new__": __new__, "__init__": __init__, "__setstate__": __setstate__, "type_name": qualname})


def _layout(name):
    """``torch.serialization._get_layout("torch.strided")``, how torch pickles a layout: its name, nothing imported."""
    if not isinstance(name, str) or not name.startswith("torch.") or len(name) > 40:
        raise pickle.UnpicklingError(f"not a torch layout name: {describe(name)}")
    return name[len("torch."):]


class _MetadataUnpickler(RestrictedUnpickler):
    """The restricted unpickler with an allow-list of DCP's metadata classes and their plain parts only."""

    def __init__(self, file, path: str, trust: bool) -> None:
        allowed: dict[tuple[str, str], Any] = {key: _record_class(".".join(key)) for key in _RECORDS}
        allowed.update({
            ("torch", "Size"): torch_size,
            ("torch", "strided"): "strided",
            ("torch.serialization", "_get_layout"): _layout,
            ("collections", "OrderedDict"): dict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
        })
        for d in dtypes.DTYPES:
            allowed[("torch", d.name)] = DTypeRef(d.name)
        for module in ("pathlib", "pathlib._local"):  # StorageMeta.checkpoint_id: the folder it was saved to
            for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
                allowed[(module, name)] = path_from_parts
        super().__init__(file, path=path, trust=trust, allowed=allowed)


# -- from records to checked metadata ---------------------------------------------------------------
class _Bad(Exception):
    pass


def _fields(record: Any, kind: str) -> dict:
    if getattr(record, "type_name", "").rsplit(".", 1)[-1] != kind:
        raise _Bad(f"expected a {kind}, found {type(record).__name__}")
    state = record.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict state, slot state)
        state = {**(state[0] or {}), **state[1]}
    if not isinstance(state, dict):
        raise _Bad(f"{kind} has no readable fields")
    return state


def _counts(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and 0 <= v < 2**62 for v in value):
        raise _Bad(f"{what} is not a list of non-negative integers: {describe(value)}")
    return tuple(value)


def _dtype_of(properties: Any) -> str:
    state = properties.state
    if isinstance(state, tuple) and state:  # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory format, pin_memory)
        dtype, layout = state[0], state[1] if len(state) > 1 else "strided"
    elif isinstance(state, dict):
        dtype, layout = state.get("dtype"), state.get("layout", "strided")
    else:
        raise _Bad("tensor properties have no dtype")
    if not isinstance(dtype, DTypeRef):
        raise _Bad(f"tensor dtype is not a torch dtype: {describe(dtype)}")
    if layout != "strided":
        raise _Bad(f"tensor layout {describe(layout)} is not strided (sparse tensors are not read)")
    return dtype.name


def _storage(info: Any, files: DcpFiles, sizes: dict[str, int]) -> tuple[str, int, int]:
    fields = _fields(info, "_StorageInfo")
    name, offset, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", "..") or name.startswith("."):
        raise _Bad(f"storage file {describe(name)} is not a plain file name in the checkpoint folder")
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise _Bad(f"storage range {describe(offset)}+{describe(length)} of {name} is not a byte range")
    if fields.get("transform_descriptors"):
        raise _Bad(f"{name}: data is stored through transforms {describe(fields['transform_descriptors'])} (compression), which shardwise does not read")
    if name not in sizes:
        region = files.region(name)
        if region is None:
            raise _Bad(f"storage file {name} is missing")
        sizes[name] = region.size
    if offset + length > sizes[name]:
        raise _Bad(f"{name} is truncated: a chunk needs bytes up to {offset + length} but the file has {sizes[name]}")
    return name, offset, length


def _index_key(index: Any) -> tuple[str, tuple[int, ...] | None]:
    fields = _fields(index, "MetadataIndex")
    fqn, offset = fields.get("fqn"), fields.get("offset")
    if not isinstance(fqn, str):
        raise _Bad(f"storage key {describe(fqn)} is not a name")
    return fqn, None if offset is None else _counts(offset, f"offset of {fqn}")


def _key_paths(planner_data: Any, entries: dict) -> dict[str, tuple] | None:
    """Every entry's key path from ``planner_data``, checked, in planner order (None without planner
    data). A path is a top-level name, then dict keys (strings) and list indices (non-negative
    integers) that, joined by dots, spells its fqn, as torch's ``flatten_state_dict`` makes it."""
    if not isinstance(planner_data, dict):
        return None
    paths = {}
    for fqn in [*(k for k in planner_data if k in entries), *(k for k in entries if k not in planner_data)]:
        path = planner_data.get(fqn)
        if path is None:
            raise _Bad(f"planner_data gives no key path for {fqn!r}, though it gives them for other keys")
        if not (
            isinstance(path, (tuple, list)) and path and isinstance(path[0], str)
            and all(isinstance(p, str) or type(p) is int and p >= 0 for p in path) and ".".join(map(str, path)) == fqn
        ):
            raise _Bad(f"planner_data gives key {fqn!r} the path {describe(path)}, which is not a key path that spells it")
        paths[fqn] = tuple(path)
    return paths


def _check_backed(fqn: str, dtype: str, chunk: DcpChunk) -> None:
    """A chunk's storage entry has room for its elements: torch saves each chunk as an uncompressed
    ``torch.save`` zip of at least its bytes. Checked here, so that the geometry a few bytes of
    metadata declare (2**40 elements and as many tiles) is bounded by the data actually present."""
    needed = math.prod(chunk.sizes) * dtypes.dtype(dtype).itemsize
    if needed > chunk.length:
        raise _Bad(f"chunk at {list(chunk.offsets)} of tensor {fqn!r} holds {needed} bytes, but its storage entry {chunk.file}[{chunk.offset}:{chunk.offset + chunk.length}] has only {chunk.length}")


def _check_disjoint(chunks: list[DcpChunk]) -> None:
    """Every chunk and object has bytes of its own: metadata pointing two entries at the same bytes
    would make one tensor silently read another's."""
    by_file: dict[str, list[DcpChunk]] = {}
    for chunk in chunks:
        by_file.setdefault(chunk.file, []).append(chunk)
    for name, found in by_file.items():
        found.sort(key=lambda c: c.offset)
        for before, after in zip(found, found[1:]):
            if after.offset < before.offset + before.length:
                raise _Bad(f"{name}: two entries share bytes {after.offset}:{min(after.offset + after.length, before.offset + before.length)}")


def _checked(root: Any, files: DcpFiles) -> DcpMetadata:
    fields = _fields(root, "Metadata")
    entries, storage_data = fields.get("state_dict_metadata"), fields.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage_data, dict):
        raise _Bad("Metadata lacks state_dict_metadata or storage_data")
    storage = {_index_key(index): info for index, info in storage_data.items()}
    sizes: dict[str, int] = {}
    tensors: dict[str, DcpTensor] = {}
    objects: dict[str, DcpChunk] = {}
    paths = _key_paths(fields.get("planner_data"), entries)
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise _Bad(f"key {describe(fqn)} is not a name")
        kind = getattr(entry, "type_name", "").rsplit(".", 1)[-1]
        if kind == "BytesStorageMetadata":
            info = storage.get((fqn, None))
            if info is None:
                raise _Bad(f"object {fqn!r} has no storage entry")
            objects[fqn] = DcpChunk((), (), *_storage(info, files, sizes))
            continue
        tensor = _fields(entry, "TensorStorageMetadata")
        shape = _counts(tensor.get("size"), f"shape of {fqn}")
        dtype = _dtype_of(tensor.get("properties"))
        chunks = []
        for chunk in tensor.get("chunks") or []:
            geometry = _fields(chunk, "ChunkStorageMetadata")
            offsets, sizes_ = _counts(geometry.get("offsets"), f"chunk offsets of {fqn}"), _counts(geometry.get("sizes"), f"chunk sizes of {fqn}")
            if len(offsets) != len(shape) or len(sizes_) != len(shape) or any(o + s > d for o, s, d in zip(offsets, sizes_, shape)):
                raise _Bad(f"chunk at {list(offsets)} of size {list(sizes_)} does not fit tensor {fqn!r} of shape {list(shape)}")
            info = storage.get((fqn, offsets))
            if info is None:
                raise _Bad(f"chunk at {list(offsets)} of tensor {fqn!r} has no storage entry")
            chunk = DcpChunk(offsets, sizes_, *_storage(info, files, sizes))
            _check_backed(fqn, dtype, chunk)
            chunks.append(chunk)
        path = paths[fqn] if paths is not None else tuple(fqn.split(".", 1))  # unflattened: the first dotted component as the top-level key
        tensors[fqn] = DcpTensor(fqn, path, shape, dtype, tuple(chunks))
    _check_disjoint([*(c for t in tensors.values() for c in t.chunks), *objects.values()])
    version = fields.get("version")
    return DcpMetadata(files, tensors, objects, version if isinstance(version, str) else None, paths)


def read_metadata(where: "str | os.PathLike | DcpFiles", *, trust: bool = False) -> DcpMetadata:
    """Read and check ``.metadata`` of a DCP folder (or :class:`DcpFiles`); FormatError (or
    UnsafeCheckpointError) naming the file and problem."""
    files = as_files(where)
    path, region = files.path(METADATA), files.region(METADATA)
    if region is None:
        raise FormatError(f"{path}: missing; a DCP checkpoint keeps its metadata there")
    if region.size > _MAX_METADATA_BYTES:
        raise FormatError(f"{path}: metadata of {region.size} bytes is larger than any DCP checkpoint writes")
    try:
        with open_region(region) as f:
            root = _MetadataUnpickler(f, path, trust).load()
        return _checked(root, files)
    except (UnsafeCheckpointError, FormatError):  # the unpickler's refusals name the file already
        raise
    except _Bad as e:
        raise FormatError(f"{path}: not a readable DCP checkpoint: {e}") from None
    except RecursionError:
        raise FormatError(f"{path}: the metadata pickle nests too deeply to read safely") from None
    except MemoryError:
        raise FormatError(f"{path}: the metadata pickle asks for more memory than any DCP metadata needs (corrupted?)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise FormatError(f"{path}: not a readable DCP metadata pickle (truncated or corrupted?): {e}") from None


# -- chunks as tiles ----------------------------------------------------------------------------------
def chunk_tiles(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], src: Any) -> list:
    """The tiles (matrix view: first dimension x the rest) that place a chunk in its global tensor.

    A chunk that spans the full extent of every dimension after some dimension ``k`` is, for each
    index of the dimensions between the first and ``k``, one contiguous run of columns: usually
    one tile (row or column shards), more for chunks cut in several inner dimensions. A chunk
    without elements has no tiles (its declared extents are never enumerated); otherwise there
    are at most as many tiles as it has elements, which :func:`read_metadata` bounds by its bytes.
    """
    from ..layout.tiles import Tile

    if not shape:
        return [Tile(0, 0, 1, 1, src)]
    if not math.prod(sizes):
        return []
    last = max([d for d in range(1, len(shape)) if sizes[d] != shape[d]], default=0)
    inner = math.prod(shape[last + 1:])
    width = (sizes[last] * inner) if last else math.prod(shape[1:])
    middle = range(1, last)
    tiles = []
    for index in itertools.product(*(range(sizes[d]) for d in middle)):
        col = sum((offsets[d] + i) * math.prod(shape[d + 1:]) for d, i in zip(middle, index)) + (offsets[last] * inner if last else 0)
        src_col = sum(i * math.prod(sizes[d + 1:]) for d, i in zip(middle, index))
        tiles.append(Tile(offsets[0], col, sizes[0], width, src, 0, src_col))
    return tiles


# -- the tensor source ----------------------------------------------------------------------------------
def _weights(metadata: DcpMetadata) -> tuple[str | None, dict[str, DcpTensor]]:
    """The key holding the weights (None: all tensors) and the weight tensors by their names under it."""
    for key in WEIGHT_KEYS:
        chosen = {".".join(map(str, t.path[1:])): t for t in metadata.tensors.values() if len(t.path) > 1 and t.path[0] == key}
        if chosen:
            return key, chosen
    return None, {t.fqn: t for t in metadata.tensors.values()}


_MAX_CORNER_GROWTH = 64  # 2**6: every chunk layout cut in up to 6 dimensions is checked in full; torch's grids stay near 2


def _cover_problem(tensor: DcpTensor) -> str | None:
    """Why ``tensor``'s chunks do not cover it exactly once (None when they do), in time linear in
    the chunks (times the dimensions they are cut in), however many of them share rows.

    The chunks (boxes inside the tensor, checked by :func:`read_metadata`) cover it exactly once
    when the sum of their indicator functions is the tensor's. Indicators of boxes are equal
    exactly when their signed corners are (each corner of a box counts +1 or -1 by how many of its
    coordinates are upper ends), so the chunks' corners, less the tensor's, must all cancel. They
    are cancelled one dimension at a time, which keeps them few for real layouts (a grid of chunks
    cancels to the tensor's own corners at every step). A layout whose corners still grow past
    ``_MAX_CORNER_GROWTH`` times the chunks is refused rather than checked at exponential cost.
    """
    boxes = [(c.offsets, c.sizes) for c in tensor.chunks if math.prod(c.sizes)]
    covered, total = sum(math.prod(sizes) for _, sizes in boxes), math.prod(tensor.shape)
    if covered != total:
        return f"the chunks hold {covered} of its {total} elements"
    if not total:
        return None
    cut = [d for d, extent in enumerate(tensor.shape) if any(sizes[d] != extent for _, sizes in boxes)]  # in the others every indicator is the tensor's
    terms: dict[tuple, int] = {}
    for offsets, sizes in boxes:
        key = tuple((offsets[d], offsets[d] + sizes[d]) for d in cut)
        terms[key] = terms.get(key, 0) + 1
    whole = tuple((0, tensor.shape[d]) for d in cut)
    terms[whole] = terms.get(whole, 0) - 1
    for level in range(len(cut)):
        corners: dict[tuple, int] = {}
        for key, weight in terms.items():
            lower, upper = key[level]
            for end, sign in ((lower, weight), (upper, -weight)):
                corner = (*key[:level], end, *key[level + 1:])
                corners[corner] = corners.get(corner, 0) + sign
        terms = {key: weight for key, weight in corners.items() if weight}
        if len(terms) > _MAX_CORNER_GROWTH * (len(boxes) + 1):
            return f"its {len(boxes)} chunks are cut too irregularly in {len(cut)} dimensions to check that they cover it exactly once"
    return None if not any(terms.values()) else "some of its chunks overlap (they hold as many elements as it has, so others leave a gap)"


class _LazyTiles(Mapping):
    """The weights' :class:`~shardwise.layout.tiles.TiledTensor` s by name, each built on first use:
    a chunk cut through inner dimensions makes a tile per row, thousands for a column-parallel
    weight, which callers that only list or slice tensors (torch_dist's stacked layers) never need."""

    def __init__(self, weights: dict[str, DcpTensor]) -> None:
        self._weights = weights
        self._built: dict = {}

    def __getitem__(self, name: str):
        from ..layout.tiles import TiledTensor

        found = self._built.get(name)
        if found is None:
            tensor = self._weights[name]
            tiles = [tile for c in tensor.chunks for tile in chunk_tiles(tensor.shape, c.offsets, c.sizes, (tensor.fqn, tensor.dtype, c))]
            found = self._built[name] = TiledTensor(TensorInfo(name, tensor.shape, tensor.dtype), tuple(tiles))
        return found

    def __contains__(self, name: object) -> bool:
        return name in self._weights

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


class _Chunks(FileTensorSource):
    """The chunks of a DCP folder as stored tensors; each chunk's zip header is parsed on first use."""

    def __init__(self, files: DcpFiles, trust: bool) -> None:
        super().__init__()
        self._files, self._trust = files, trust

    def entry(self, fqn: str, dtype: str, chunk: DcpChunk) -> StoredTensor:
        """The stored chunk of tensor ``fqn`` (whose dtype is ``dtype``)."""
        name = f"{fqn}@{list(chunk.offsets)}"
        found = self._tensors.get(name)
        if found is None:
            found = self._tensors[name] = self._parse(fqn, dtype, chunk, name)
        return found

    def _parse(self, fqn: str, dtype: str, chunk: DcpChunk, name: str) -> StoredTensor:
        from .torch_pickle import read_torch_pickle

        file = self._files.region(chunk.file)
        if file is None:  # checked when the metadata was read; gone since
            raise FormatError(f"{self._files.path(chunk.file)}: missing")
        label = f"{self._files.path(chunk.file)}[{chunk.offset}:{chunk.offset + chunk.length}] (chunk at {list(chunk.offsets)} of '{fqn}')"
        parsed = read_torch_pickle(Region(file.path, file.start + chunk.offset, chunk.length, label), trust=self._trust)
        lazy = parsed.root
        if not isinstance(lazy, LazyTensor) or lazy.shape != chunk.sizes or lazy.dtype != dtype:
            found = f"a {lazy.dtype} tensor of shape {list(lazy.shape)}" if isinstance(lazy, LazyTensor) else f"a {type(lazy).__name__}"
            raise FormatError(f"{label}: holds {found}, but the metadata says {dtype} of shape {list(chunk.sizes)}")
        return parsed.stored(lazy, name)


class DcpSource(TiledSource):
    """The weights of a DCP folder as a lazy tensor source (see the module docstring).

    A tensor saved whole is ``stored()`` in place (its chunk); a sharded one is :meth:`tiled`,
    its tiles resolved by :meth:`lookup`, for streaming writers. ``all_tensors``: every tensor of
    the folder instead, named by its fqn (``weights_key`` is then None).
    """

    format_name = "dcp"

    def __init__(self, where: "str | os.PathLike | DcpFiles", *, trust: bool = False, all_tensors: bool = False) -> None:
        super().__init__()
        self.metadata = read_metadata(where, trust=trust)
        self.weights_key, weights = (None, self.metadata.tensors) if all_tensors else _weights(self.metadata)
        self._chunks = _Chunks(self.metadata.files, trust)
        for tensor in weights.values():
            problem = _cover_problem(tensor)
            if problem:
                raise FormatError(f"{self.metadata.files.path(METADATA)}: the chunks of tensor '{tensor.fqn}' do not tile it: {problem}")
        self._weights = weights
        self._tiled = _LazyTiles(weights)  # type: ignore[assignment]
        self.training_state = self._training_state()

    def info(self, name: str) -> TensorInfo:
        tensor = self._weights[name]
        return TensorInfo(name, tensor.shape, tensor.dtype)

    def infos(self) -> list[TensorInfo]:
        return [self.info(name) for name in self._weights]

    def _training_state(self) -> dict:
        key = self.weights_key
        others = [] if key is None else [t for t in self.metadata.tensors.values() if t.path[0] != key]
        return {
            "weights_key": key,
            "other_tensors": {"num_tensors": len(others), "total_bytes": sum(t.nbytes for t in others)},
            "objects": sorted(self.metadata.objects),
            "dcp_version": self.metadata.version,
        }

    def layout(self) -> dict:
        """What ``inspect`` shows: how the weights were saved (files, chunks, tensors saved in pieces)."""
        tensors = list(self.metadata.tensors.values())
        return {
            "kind": "dcp",
            "files": len({c.file for t in tensors for c in t.chunks} | {o.file for o in self.metadata.objects.values()}),
            "chunks": sum(len(t.chunks) for t in tensors),
            "sharded_weights": sum(1 for t in self._weights.values() if len(t.chunks) > 1),
        }

    def lookup(self, ref: tuple[str, str, DcpChunk]) -> tuple[FileTensorSource, StoredTensor]:
        return self._chunks, self._chunks.entry(*ref)

    def close(self) -> None:
        super().close()
        self._chunks.close()


# -- the whole state, nested again ------------------------------------------------------------------------
def read_state(folder: "str | os.PathLike | DcpFiles", *, trust: bool = False, allowed: tuple = ()) -> dict:
    """Everything a DCP folder holds, as the nested dict ``torch.distributed.checkpoint.save`` was given.

    Byte objects are read first, each with ``torch.load(weights_only=True)`` plus the inert
    ``allowed`` classes unless ``trust``; anything else they pickle is an UnsafeCheckpointError
    naming the ``.distcp`` file and byte range, raised before any tensor is read. Then every tensor
    is read whole onto CPU, its chunks (from all ranks) placed one after another into one new
    tensor: memory is the state once, plus a band of rows in flight.

    The nesting comes from ``planner_data`` (:attr:`DcpMetadata.paths`): string components are dict
    keys, integer ones list indices, as in torch's ``unflatten_state_dict``; without planner data
    each fqn is a top-level key. What torch's flattening drops stays dropped: empty dicts are not
    saved at all, dict keys come back as strings, ``OrderedDict`` as ``dict``; a list slot that held
    only empty dicts comes back None (torch 2.13's ``dcp_to_torch_save`` fails on such a list).
    FormatError (naming ``.metadata``) for paths that contradict each other or name a list item
    beyond 2**24, a chunk that does not hold what the metadata says, or a truncated file.
    """
    from ..training.files import torch_load

    with DcpSource(folder, trust=trust, all_tensors=True) as source:
        metadata = source.metadata
        objects = {}
        for fqn, chunk in metadata.objects.items():
            path, file = metadata.files.path(chunk.file), metadata.files.region(chunk.file)
            region = Region(file.path, file.start + chunk.offset, chunk.length, f"{path}[{chunk.offset}:{chunk.offset + chunk.length}] (object '{fqn}')")
            objects[fqn] = torch_load(region, trust, allowed=allowed)
        paths = metadata.paths if metadata.paths is not None else {fqn: (fqn,) for fqn in [*metadata.tensors, *metadata.objects]}
        nest = _Nest(metadata.folder / METADATA)
        for fqn, path in paths.items():
            nest.put(fqn, path, objects.pop(fqn) if fqn in objects else source.read(fqn))
        return nest.result()


_MAX_LIST_INDEX = 2**24  # list items (gaps from empty dicts DCP drops included): far beyond any optimizer's parameter count


class _Nest:
    """Builds the nested dict from (key path, value) pairs. Containers are dicts while building (list
    slots collected by index) and become lists at the end; a value never counts as a container,
    even when it is a dict (an older torch saved dicts without tensors as one byte object).
    Contradictory paths are a FormatError naming ``where``."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.root: dict = {}
        self.is_list: dict[int, bool] = {id(self.root): False}  # the containers made here, by id

    def put(self, fqn: str, path: tuple, value: Any) -> None:
        for key in path:  # at every level: building a list allocates up to its largest index
            if type(key) is int and not 0 <= key < _MAX_LIST_INDEX:
                raise FormatError(f"{self.where}: key {fqn!r} names list item {key}; no checkpoint shardwise reads has lists that long")
        node = self.root
        for depth, (key, next_key) in enumerate(zip(path, path[1:])):
            if key not in node:
                node[key] = {}
                self.is_list[id(node[key])] = type(next_key) is int
            child = node[key]
            if self.is_list.get(id(child)) != (type(next_key) is int):  # a value, or the other kind of container
                raise FormatError(f"{self.where}: key {fqn!r} needs {'.'.join(map(str, path[:depth + 1]))} to be another kind of container than other keys make it")
            node = child
        key = path[-1]
        if key in node:
            raise FormatError(f"{self.where}: key {fqn!r} is saved twice, or under a key other entries are saved below")
        node[key] = value

    def result(self) -> dict:
        return self._built(self.root)

    def _built(self, node: dict) -> Any:
        built = {key: self._built(value) if id(value) in self.is_list else value for key, value in node.items()}
        if not self.is_list[id(node)]:
            return built
        items = [None] * (max(built) + 1)
        for index, value in built.items():
            items[index] = value
        return items
