"""Torch's pickle checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read lazily and written by streaming.

Reading: the pickle (``data.pkl`` in the zip format, the main pickle in torch's legacy format) is
loaded with :class:`~shardwise.pickle_safety.RestrictedUnpickler`, which builds the object tree
with :class:`LazyTensor` records instead of tensors; each storage's byte offset in the file is
then located (zip local headers, or the size-prefixed records of the legacy format), so tensors
are read on demand with ``preadv``. Nothing is executed and no tensor data is read to open a file.

Writing: :func:`write_torch` produces torch's zip format (through
:class:`~shardwise.formats.zipwriter.StoredZipWriter`) for a flat state dict: ``data.pkl``
(an ``OrderedDict`` rebuilt with ``torch._utils._rebuild_tensor_v2``/``_v3``, as ``torch.save``
writes it), ``.format_version``, ``.storage_alignment``, ``byteorder``, one ``data/N`` record per
tensor aligned to 64 bytes, and ``version``. Data is streamed one tensor at a time, and the
result loads with ``torch.load(..., weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

from .. import dtypes
from ..errors import FormatError, UnsafeCheckpointError
from ..pickle_safety import LazyTensor, RestrictedUnpickler, StorageRef, StructureError, describe, storage_ref
from ..tensors import FileTensorSource, StoredTensor, TensorInfo, contiguous_strides
from .region import Region, as_region, open_region
from .lightning import is_lightning, select_weights, training_state
from .zipwriter import StoredZipWriter

__all__ = [
    "TorchFile", "TorchPickle", "read_torch_pickle", "write_torch", "write_torch_archive", "looks_like_torch",
    "stub_pickle", "TensorStub", "GlobalStub", "ObjectStub",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# data.pkl holds ~100 bytes per tensor plus the rest of the saved object: a few MB for the largest
# models, tens of MB for pickled optimizer or loop states. Ten times that still fits in memory with
# the objects unpickled from it; a deflated member declaring more (a zip bomb: 1 MB inflating to
# GBs) is refused before it is inflated. Legacy files are read in place, bounded by their size.
MAX_PICKLE_BYTES = 256 << 20
# Bytes that views with stride 0 or overlapping strides (torch.expand) may add to a file's output,
# all tensors together: converting materialises them, so a 62 KB file of such views could otherwise
# declare a terabyte. Expanded buffers in real state dicts (position ids, masks) are a few MB at most.
MAX_VIEW_EXPANSION = 256 << 20
# Tensors may also share storage without stride 0: tied weights (an embedding and its output layer,
# T5's four uses of one embedding) are whole views of one storage. All tensors of a file together
# may declare at most this many times the file's size (plus MAX_VIEW_EXPANSION), so that a file
# listing one large storage thousands of times is refused instead of becoming thousands of copies.
MAX_SHARED_VIEWS_FACTOR = 4
_ALIGNMENT = 64


_UNPICKLE_FAILURES = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError, struct.error,
    zipfile.BadZipFile, NotImplementedError,  # a damaged member: bad CRC or header, an unknown compression or zip version
)


def looks_like_torch(head: bytes) -> bool:
    """Zip archives (torch >= 1.6) and legacy-format pickles (any protocol: the magic number comes first)."""
    if head.startswith(b"PK\x03\x04"):
        return True
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    return head[:1] == b"L" and head[1:2].isdigit()  # protocols 0 and 1 write the magic as a text long


class TorchPickle:
    """The unpickled object tree of a torch file plus where each tensor's bytes are.

    ``root`` is the object ``torch.load`` would return, with :class:`LazyTensor` in place of tensors
    and inert records in place of allow-listed objects. ``stored(lazy, name)`` locates a tensor.
    """

    def __init__(self, region: Region, root: Any, storage_offsets: dict[str, tuple[int, int]], globals_seen: frozenset[str] = frozenset()) -> None:
        self.region = region
        self.path = region.label
        self.root = root
        self.globals_seen = globals_seen  # every global the pickle names (so xser references are found without a walk)
        self._storage_offsets = storage_offsets  # key -> (byte offset in the region, byte length)
        self._expansion = 0  # bytes the views located so far add beyond what they read (see MAX_VIEW_EXPANSION)
        self._declared = 0  # bytes the tensors located so far declare (see MAX_SHARED_VIEWS_FACTOR)

    def stored(self, lazy: LazyTensor, name: str) -> StoredTensor:
        """Where ``lazy``'s elements are; FormatError if its view reaches past its storage, if the
        views located so far expand their storage bytes by more than MAX_VIEW_EXPANSION together, or
        if the tensors located so far declare more than MAX_SHARED_VIEWS_FACTOR times the file's
        size (plus MAX_VIEW_EXPANSION): storage shared that often can only be a bomb."""
        row = dtypes.dtype(lazy.dtype)
        try:
            start, length = self._storage_offsets[lazy.storage.key]
        except KeyError:
            raise FormatError(f"{self.path}: tensor '{name}' refers to storage {describe(lazy.storage.key)}, which the file lacks") from None
        info = TensorInfo(name, lazy.shape, lazy.dtype)
        entry = StoredTensor.make(info, self.region.path, self.region.start + start + lazy.storage_offset * row.itemsize, lazy.strides)
        self._expansion += max(0, info.nbytes - entry.span)
        if self._expansion > MAX_VIEW_EXPANSION:
            raise FormatError(
                f"{self.path}: tensor '{name}' is a view that expands {entry.span:,} bytes of storage to {info.nbytes:,}; "
                f"the file's expanded views would add {self._expansion:,} bytes, more than the {MAX_VIEW_EXPANSION:,} "
                "shardwise materialises from a file (re-save it with the tensors made contiguous)"
            )
        self._declared += info.nbytes
        allowed = MAX_SHARED_VIEWS_FACTOR * self.region.size + MAX_VIEW_EXPANSION
        if self._declared > allowed:
            raise FormatError(
                f"{self.path}: its tensors, up to '{name}', declare {self._declared:,} bytes, more than "
                f"{MAX_SHARED_VIEWS_FACTOR} times the file's {self.region.size:,} bytes (plus {MAX_VIEW_EXPANSION:,}): "
                "they share storage too often to be materialised (re-save it with each tensor's own storage)"
            )
        if lazy.storage_offset * row.itemsize + entry.span > length:
            raise FormatError(
                f"{self.path}: file is truncated or corrupted: tensor '{name}' needs "
                f"{lazy.storage_offset * row.itemsize + entry.span} bytes of storage {describe(lazy.storage.key)}, "
                f"which holds {length}"
            )
        return entry


def read_torch_pickle(path: str | os.PathLike | Region, *, trust: bool = False) -> TorchPickle:
    """Unpickle a torch file (or archive member) safely (see module docstring).

    Raises FormatError or UnsafeCheckpointError naming the file.
    """
    region = as_region(path)
    path = region.label
    if region.size == 0:
        raise FormatError(f"{path}: file is empty")
    with open_region(region) as f:
        head = f.read(4)
    try:
        if head.startswith(b"PK"):
            return _read_zip(region, trust)
        return _read_legacy(region, trust)
    except (UnsafeCheckpointError, FormatError):
        raise
    except RecursionError:
        raise FormatError(f"{path}: the pickle nests too deeply to read safely") from None
    except MemoryError:
        raise FormatError(f"{path}: the pickle asks for more memory than this machine has") from None
    except _UNPICKLE_FAILURES as e:
        raise FormatError(f"{path}: not a readable torch checkpoint, or truncated ({type(e).__name__}: {e})") from None


def _read_zip(region: Region, trust: bool) -> TorchPickle:
    path = region.label
    raw = open_region(region)
    try:
        archive = zipfile.ZipFile(raw)
    except zipfile.BadZipFile:
        raw.close()
        raise FormatError(f"{path}: file is truncated or corrupted: its zip directory cannot be read") from None
    with archive, raw:
        members = {i.filename: i for i in archive.infolist()}
        pkl = next((n for n in members if n.endswith("data.pkl") and n.count("/") <= 1), None)
        if pkl is None:
            raise FormatError(f"{path}: zip archive without data.pkl; not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        order = members.get(prefix + "byteorder")
        try:
            byteorder = archive.read(order).strip() if order is not None else b""
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as e:
            raise FormatError(f"{path}: file is truncated or corrupted: its byteorder record cannot be read ({e})") from None
        if byteorder not in (b"", b"little"):
            raise FormatError(f"{path}: big-endian torch checkpoints are not supported")

        def locate(key: str) -> tuple[int, int]:
            info = members.get(f"{prefix}data/{key}")
            if info is None:
                raise FormatError(f"{path}: storage record data/{key} is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise FormatError(f"{path}: storage data/{key} is compressed; shardwise reads torch's uncompressed archives")
            raw.seek(info.header_offset)
            local = raw.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise FormatError(f"{path}: corrupted zip local header for data/{key}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            return info.header_offset + 30 + name_len + extra_len, info.file_size

        refs: dict[str, StorageRef] = {}

        def persistent(pid: Any) -> StorageRef:
            ref = storage_ref(pid, path)
            refs.setdefault(ref.key, ref)
            return ref

        data = _read_pickle_member(archive, members[pkl], path)
        seen: set[str] = set()
        root = RestrictedUnpickler(io.BytesIO(data), path=path, persistent_load=persistent, trust=trust, seen=seen).load()
        offsets = {key: locate(key) for key in refs}
        for key, (start, length) in offsets.items():
            if start + length > region.size:
                raise FormatError(f"{path}: file is truncated: storage data/{key} ends past the end of the file")
    return TorchPickle(region, root, offsets, frozenset(seen))


def _read_pickle_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """The bytes of ``data.pkl``, refused (FormatError) past MAX_PICKLE_BYTES before anything is inflated.

    Reads exactly the declared size: ``archive.read`` would inflate a whole deflate stream before
    cutting it to a (lying, small) declared size; a short or altered stream fails its CRC check.
    """
    if info.file_size > MAX_PICKLE_BYTES:
        raise FormatError(
            f"{path}: {info.filename} declares {info.file_size:,} bytes of pickle, more than the {MAX_PICKLE_BYTES:,} "
            "any real checkpoint needs (a zip bomb?); it was not inflated"
        )
    try:
        with archive.open(info) as member:
            data = member.read(info.file_size)
            if len(data) < info.file_size:
                raise zipfile.BadZipFile(f"{len(data):,} bytes where {info.file_size:,} were declared")
    except zipfile.BadZipFile as e:
        raise FormatError(f"{path}: corrupted archive member {info.filename} ({e})") from None
    return data


def _read_legacy(region: Region, trust: bool) -> TorchPickle:
    """Torch's pre-1.6 format: magic, protocol, sys_info, main pickle, storage keys, then raw storages."""
    path = region.label
    refs: dict[str, StorageRef] = {}

    def persistent(pid: Any) -> StorageRef:
        ref = storage_ref(pid, path)
        if len(pid) > 5 and pid[5] is not None:
            raise FormatError(f"{path}: legacy storage views are not supported")
        refs.setdefault(ref.key, ref)
        return ref

    with open_region(region) as f:
        seen: set[str] = set()
        unpickle = lambda: RestrictedUnpickler(f, path=path, persistent_load=persistent, trust=trust, seen=seen).load()  # noqa: E731
        if unpickle() != _LEGACY_MAGIC:
            raise FormatError(f"{path}: not a torch checkpoint (neither a zip archive nor torch's legacy pickle format)")
        unpickle()  # protocol version
        sys_info = unpickle()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise FormatError(f"{path}: big-endian torch checkpoints are not supported")
        root = unpickle()
        keys = unpickle()
        offsets: dict[str, tuple[int, int]] = {}
        file_size = region.size
        pos = f.tell()
        for key in keys:
            ref = refs.get(key)
            header = _pread(f, pos, 8)
            if len(header) < 8:
                raise FormatError(f"{path}: file is truncated: storage {describe(key)} is missing")
            (numel,) = struct.unpack("<q", header)
            itemsize = dtypes.dtype(ref.dtype).itemsize if ref is not None and ref.dtype else 1
            offsets[key] = (pos + 8, numel * itemsize)
            pos += 8 + numel * itemsize
            if pos > file_size:
                raise FormatError(f"{path}: file is truncated: storage {describe(key)} ends past the end of the file")
    return TorchPickle(region, root, offsets, frozenset(seen))


def _pread(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


# -- writing -----------------------------------------------------------------------------------
class GlobalStub:
    """A reference written as a pickle GLOBAL opcode without importing its module."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError("placeholder")


class _StorageStub:
    __slots__ = ("pid",)

    def __init__(self, pid: tuple) -> None:
        self.pid = pid


class TensorStub:
    """Pickles exactly as ``torch.save`` pickles a contiguous tensor with its own storage."""

    __slots__ = ("reduced",)

    def __init__(self, key: str, info: TensorInfo) -> None:
        row = dtypes.dtype(info.dtype)
        stride = contiguous_strides(info.shape)
        hooks = collections.OrderedDict()
        if row.storage_class:
            storage = _StorageStub(("storage", GlobalStub("torch", row.storage_class), key, "cpu", info.numel))
            self.reduced = (GlobalStub("torch._utils", "_rebuild_tensor_v2"), (storage, 0, info.shape, stride, False, hooks))
        else:
            storage = _StorageStub(("storage", GlobalStub("torch.storage", "UntypedStorage"), key, "cpu", info.nbytes))
            dtype = GlobalStub("torch", row.name)
            self.reduced = (GlobalStub("torch._utils", "_rebuild_tensor_v3"), (storage, 0, info.shape, stride, False, hooks, dtype))

    def __reduce__(self):
        return self.reduced


class ObjectStub:
    """Pickles as an instance of the class ``cls`` (a :class:`GlobalStub`) with ``__dict__`` ``state``,
    the way protocol 2 pickles a plain Python object: ``cls``, ``()``, NEWOBJ, ``state``, BUILD."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: GlobalStub, state: dict) -> None:
        self.cls, self.state = cls, state


class _StubPickler(pickle._Pickler):  # the pure-Python pickler lets us emit GLOBALs for GlobalStub
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_global_ref(self, obj: GlobalStub) -> None:
        first = self._globals.setdefault((obj.module, obj.name), obj)  # one GLOBAL per name, as pickle memoizes classes
        if id(first) in self.memo:
            self.write(self.get(self.memo[id(first)][0]))
            return
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    def _save_object(self, obj: ObjectStub) -> None:
        self.save(obj.cls)
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    dispatch[GlobalStub] = _save_global_ref
    dispatch[ObjectStub] = _save_object

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._globals: dict[tuple[str, str], GlobalStub] = {}

    def persistent_id(self, obj: Any):
        return obj.pid if isinstance(obj, _StorageStub) else None


def stub_pickle(obj: Any) -> bytes:
    """Pickle ``obj`` (plain containers, :class:`TensorStub`, :class:`GlobalStub`, :class:`ObjectStub`) as torch.save would (protocol 2)."""
    buf = io.BytesIO()
    _StubPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def state_dict_pickle(infos: list[TensorInfo]) -> bytes:
    """``data.pkl`` for an ``OrderedDict`` of the given tensors; storage keys are "0", "1", ... in order."""
    return stub_pickle(collections.OrderedDict((info.name, TensorStub(str(i), info)) for i, info in enumerate(infos)))


def write_torch_archive(f: BinaryIO, archive_name: str, data_pkl: bytes, records: list[tuple[int, Callable[[BinaryIO], None]]], *, force_zip64: bool = False) -> None:
    """Write torch's zip format: ``data_pkl`` as ``data.pkl``, then record ``data/<i>`` of ``records[i] = (nbytes, produce)``.

    ``produce(sink)`` must write exactly ``nbytes`` bytes (a zip member: CRC-32 is computed as data
    goes through). ``archive_name`` is the folder inside the zip (torch uses the file's stem).
    ``force_zip64`` writes zip64 records even for small files (for tests of the large-file path).
    """
    prefix = f"{archive_name}/"
    archive = StoredZipWriter(f, alignment=_ALIGNMENT, force_zip64=force_zip64)
    archive.write_bytes(prefix + "data.pkl", data_pkl)
    archive.write_bytes(prefix + ".format_version", b"1")
    archive.write_bytes(prefix + ".storage_alignment", str(_ALIGNMENT).encode())
    archive.write_bytes(prefix + "byteorder", b"little")
    for key, (nbytes, produce) in enumerate(records):
        archive.write_member(f"{prefix}data/{key}", nbytes, produce)
    archive.write_bytes(prefix + "version", b"3\n")
    archive.close()


def write_torch(
    f: BinaryIO,
    archive_name: str,
    infos: list[TensorInfo],
    write_tensor: Callable[[TensorInfo, BinaryIO], None],
    *,
    force_zip64: bool = False,
) -> None:
    """Write a flat state dict in torch's zip format to the seekable binary file ``f``.

    ``write_tensor(info, sink)`` is called once per tensor, in the order given, and must write
    exactly ``info.nbytes`` bytes to ``sink``. See :func:`write_torch_archive` for the rest.
    """
    names = [t.name for t in infos]
    if len(set(names)) != len(names):
        raise FormatError("duplicate tensor names cannot be written to one torch file")
    records = [(info.nbytes, lambda sink, info=info: write_tensor(info, sink)) for info in infos]
    write_torch_archive(f, archive_name, state_dict_pickle(infos), records, force_zip64=force_zip64)


# -- the tensor source ---------------------------------------------------------------------------


class TorchFile(FileTensorSource):
    """A torch pickle file as a lazy tensor source (see :mod:`shardwise.formats.lightning` for
    which part counts as weights).

    ``format_name`` is ``"lightning"`` for Lightning ``.ckpt`` files, else ``"torch"``;
    ``weights_key`` names the mapping the weights came from; ``training_state`` summarises the rest
    (epoch, global_step, optimizer states, schedulers, hyper-parameters) as plain data. ``xser``
    is True for a torch-xla xser file, whose tensors are read from ``P.tensors/tensor_<tid>.pt``.
    """

    def __init__(self, path: str | os.PathLike | Region, *, trust: bool = False) -> None:
        from .xser import XserPickle, resolve_references

        super().__init__()
        parsed = resolve_references(read_torch_pickle(path, trust=trust), trust=trust)
        self.xser = isinstance(parsed, XserPickle)
        self.path = parsed.path
        self.format_name = "lightning" if is_lightning(parsed.root) else "torch"
        try:
            self.weights_key, tensors = select_weights(parsed.root)
            self.training_state = training_state(parsed.root, self.weights_key)
        except StructureError as e:
            raise FormatError(f"{self.path}: {e}") from None
        except RecursionError:
            raise FormatError(f"{self.path}: the pickled structure nests too deeply to read safely") from None
        for name, lazy in tensors:
            if name in self._tensors:
                raise FormatError(f"{self.path}: two tensors flatten to the same name '{name}'")
            self._tensors[name] = parsed.stored(lazy, name)
