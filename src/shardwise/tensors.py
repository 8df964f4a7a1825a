"""Tensors as shardwise sees them: described without data, read on demand.

A :class:`TensorSource` knows every tensor's name, shape and dtype from headers alone; data is read
only when asked for, one tensor (or one byte range of it) at a time. Sources built on files expose
each tensor as a :class:`StoredTensor` (file, byte offset, element strides) so that the conversion
engine can move raw bytes without ever building a torch tensor, and so that nothing here needs
torch until a caller asks for a ``torch.Tensor``.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

from .dtypes import dtype as dtype_row, name_of as dtype_name_of
from .errors import FormatError

__all__ = [
    "TensorInfo",
    "StoredTensor",
    "TensorSource",
    "FileTensorSource",
    "contiguous_strides",
    "tensor_from_bytes",
    "tensor_bytes",
]


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading it: name, shape, dtype (canonical torch name)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return dtype_row(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides, computed as torch does (a dimension of size 0 counts as 1)."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    if math.prod(shape) == 0:
        return True
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's elements live in a file.

    ``offset`` is the byte offset of element ``[0, ..., 0]``; ``strides`` are element strides, or
    None when the tensor is stored row-major and contiguous, in which case its bytes are exactly
    ``file[offset : offset + info.nbytes]``, little-endian.
    """

    info: TensorInfo
    path: str
    offset: int
    strides: tuple[int, ...] | None = None

    @staticmethod
    def make(info: TensorInfo, path: str, offset: int, strides: tuple[int, ...]) -> "StoredTensor":
        """Build one, normalising strides to None when they describe a contiguous layout."""
        return StoredTensor(info, path, offset, None if _is_contiguous(info.shape, strides) else tuple(strides))

    @property
    def contiguous(self) -> bool:
        return self.strides is None

    @property
    def span(self) -> int:
        """Bytes from ``offset`` to the end of the last element (what must be read to build it)."""
        if self.info.numel == 0:
            return 0
        if self.strides is None:
            return self.info.nbytes
        last = sum((size - 1) * stride for size, stride in zip(self.info.shape, self.strides))
        return (last + 1) * self.info.itemsize


@runtime_checkable
class TensorSource(Protocol):
    """A lazy, read-only collection of named tensors.

    ``keys()`` and ``info()`` never read tensor data. ``read()`` returns a new CPU ``torch.Tensor``
    that owns its memory. ``stored()`` gives the file location of a tensor when the source is
    file-backed (None otherwise), for byte-level copying. Sources hold open files: use them as
    context managers or call ``close()``. Not thread-safe.
    """

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str): ...

    def stored(self, name: str) -> StoredTensor | None: ...

    def close(self) -> None: ...


class _Descriptors:
    """Read-only descriptors of source files, shared by all sources of the process, at most
    ``limit`` idle ones kept open (least recently used closed first).

    A checkpoint can have more files than the process may open: xser keeps one file per tensor,
    and a resharded checkpoint one per rank. A descriptor is pinned while a read or ``mmap`` call
    uses it (``with descriptors.use(owner, path) as fd``) and is never closed under a caller,
    whatever other threads do; ``mmap`` keeps its own duplicate.
    """

    def __init__(self, limit: int = 128) -> None:
        self.limit = limit
        self._open: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._pins: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self._orphans: collections.deque[int] = collections.deque()  # owners collected without close()

    @contextlib.contextmanager
    def use(self, owner: object, path: str) -> Iterator[int]:
        key = (id(owner), path)
        with self._lock:
            self._drain()
            fd = self._open.pop(key, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
            self._open[key] = fd
            self._pins[key] = self._pins.get(key, 0) + 1
            self._evict()
        try:
            yield fd
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
                    if key not in self._open:  # released while in use: close it now
                        os.close(fd)

    def _evict(self) -> None:
        idle = [k for k in self._open if k not in self._pins]
        for key in idle[: max(0, len(self._open) - self.limit)]:
            os.close(self._open.pop(key))

    def release(self, owner: object) -> None:
        """Close ``owner``'s descriptors (those in use are closed when their call ends)."""
        with self._lock:
            self._drain()
            self._release_id(id(owner))

    def release_later(self, owner: object) -> None:
        """For finalizers: note ``owner`` as gone, its descriptors closed at the next call.

        Takes no lock: the garbage collector may run a finalizer while this thread holds the
        lock (inside :meth:`use`), and taking it there would deadlock.
        """
        self._orphans.append(id(owner))

    def close_orphans(self) -> None:
        """Close now what finalized owners left (normally done at the next call)."""
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        while self._orphans:
            self._release_id(self._orphans.popleft())

    def _release_id(self, owner_id: int) -> None:
        for key in [k for k in self._open if k[0] == owner_id]:
            fd = self._open.pop(key)
            if key not in self._pins:
                os.close(fd)


_DESCRIPTORS = _Descriptors()


class FileTensorSource:
    """A source whose tensors all live at known offsets in local files.

    Subclasses fill ``self._tensors`` (name -> :class:`StoredTensor`, in on-disk order). Reads use
    ``preadv`` into caller-owned or fresh buffers; :meth:`mapped_bytes` and :meth:`map` give views
    of the file's pages instead, which count in resident memory while they live. Files are opened
    on demand and share a process-wide pool of descriptors, so sources of many files never exhaust
    the descriptor limit.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, StoredTensor] = {}

    # -- the TensorSource protocol -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def infos(self) -> list[TensorInfo]:
        return [t.info for t in self._tensors.values()]

    def stored(self, name: str) -> StoredTensor | None:
        return self._entry(name)

    def read(self, name: str):
        """The whole tensor as a new contiguous CPU ``torch.Tensor``."""
        import torch

        entry = self._entry(name)
        torch_dtype = dtype_row(entry.info.dtype).torch()
        # torch.empty, not bytearray: no zero-filling pass over memory that preadv overwrites anyway
        if entry.contiguous:
            out = torch.empty(entry.info.shape, dtype=torch_dtype)
            self.read_into(entry, entry.offset, tensor_bytes(out))
            return out
        flat = torch.empty(entry.span // entry.info.itemsize, dtype=torch_dtype)
        self.read_into(entry, entry.offset, tensor_bytes(flat))
        return torch.as_strided(flat, entry.info.shape, entry.strides).contiguous()

    def map(self, name: str):
        """The tensor as a copy-on-write view of the file's pages (mmap), without reading it now.

        What ``safetensors.torch.load_file`` returns: pages are shared with the page cache, and a
        write to the tensor copies only the page it touches. The file must not be truncated or
        rewritten while the tensor lives. Strided and empty tensors are read instead.
        """
        import mmap

        import torch

        entry = self._entry(name)
        info = entry.info
        if not entry.contiguous or info.nbytes == 0:
            return self.read(name)
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
        with self._descriptor(entry.path) as fd:
            mapping = mmap.mmap(fd, entry.offset + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=entry.offset - start)
        return flat.view(dtype_row(info.dtype).torch()).reshape(info.shape)

    def mapped_bytes(self, entry: StoredTensor, start: int = 0, length: int | None = None) -> memoryview:
        """Bytes ``start:start+length`` of ``entry``'s stored span (all of it by default) as a read-only
        view of the file's pages (no copy; pages are faulted in as they are read: ``MAP_POPULATE``
        cost about 1.4 s more per 2 GiB written from maps of 16 MiB on this VM).

        The mapping lives as long as the view (or any slice of it) does; dropping the last reference
        unmaps it. Mapped pages count in resident memory while mapped, so callers map what they are
        about to use. A file already shorter than that is a FormatError; one truncated while mapped,
        or a disk error under the mapping, kills the process with SIGBUS, as for any mmap reader
        (``safetensors`` included). Where the filesystem cannot map, the bytes are read instead.
        """
        import mmap

        length = entry.span - start if length is None else length
        if start < 0 or length < 0 or start + length > entry.span:
            raise ValueError(f"bytes {start}:{start + length} are outside tensor '{entry.info.name}' ({entry.span} bytes)")
        begin, end = entry.offset + start, entry.offset + start + length
        with self._descriptor(entry.path) as fd:
            if os.fstat(fd).st_size < end:
                raise FormatError(f"{entry.path}: file is truncated: tensor '{entry.info.name}' needs bytes up to offset {end}")
            if length == 0:
                return memoryview(b"")
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED
            try:
                mapping = mmap.mmap(fd, end - aligned, flags=flags, prot=mmap.PROT_READ, offset=aligned)
            except OSError:  # a filesystem that cannot map (some FUSE mounts): read the bytes instead
                out = memoryview(bytearray(length))
                self.read_into(entry, begin, out)
                return out
        return memoryview(mapping)[begin - aligned:]

    def read_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` of dimension 0, reading only their bytes when the tensor is contiguous."""
        entry = self._entry(name)
        info = entry.info
        if not info.shape:
            raise IndexError(f"{name} is a 0-d tensor and has no rows")
        start, stop, _ = slice(start, stop).indices(info.shape[0])
        stop = max(start, stop)
        if not entry.contiguous:
            return self.read(name)[start:stop].clone()
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        part = TensorInfo(name, (stop - start, *info.shape[1:]), info.dtype)
        buf = bytearray(part.nbytes)
        self.read_into(entry, entry.offset + start * row_bytes, memoryview(buf))
        return tensor_from_bytes(buf, part)

    def read_into(self, entry: StoredTensor, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the file's bytes from ``offset``; a short file is a FormatError."""
        done = 0
        with self._descriptor(entry.path) as fd:
            while done < len(out):
                n = os.preadv(fd, [out[done:]], offset + done)
                if n == 0:
                    raise FormatError(
                        f"{entry.path}: file is truncated: tensor '{entry.info.name}' needs bytes up to offset "
                        f"{offset + len(out)} but the file ends at {offset + done}"
                    )
                done += n

    def close(self) -> None:
        _DESCRIPTORS.release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leak descriptors; see release_later for why not close()
        _DESCRIPTORS.release_later(self)

    # -- helpers ---------------------------------------------------------------------------------
    def _entry(self, name: str) -> StoredTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r}") from None

    def _descriptor(self, path: str):
        """``with self._descriptor(path) as fd``: a read-only descriptor of ``path``, valid inside the block."""
        return _DESCRIPTORS.use(self, path)


def tensor_from_bytes(buf: bytearray | memoryview, info: TensorInfo):
    """A torch tensor of ``info``'s shape and dtype viewing ``buf`` (little-endian, row-major)."""
    import torch

    torch_dtype = dtype_row(info.dtype).torch()
    if info.numel == 0:
        return torch.empty(info.shape, dtype=torch_dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(torch_dtype).reshape(info.shape)


def tensor_bytes(tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying and without numpy.

    The view shares the tensor's memory and keeps the tensor alive for as long as it exists.
    """
    import ctypes

    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    array.owner = tensor  # the memoryview keeps ``array`` alive, ``array`` keeps the tensor alive
    return memoryview(array).cast("B")



class MemorySource:
    """In-memory tensors (a state dict) seen as a :class:`TensorSource`.

    ``read`` returns each tensor detached, on CPU and contiguous (a copy only when it is not
    already so); ``stored`` is None, so the engine writes these tensors whole, one at a time.
    Non-tensor values are refused with FormatError naming the key.
    """

    def __init__(self, state_dict: dict, label: str = "state dict") -> None:
        import torch

        self._tensors: dict = {}
        for name, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise FormatError(f"{label}: entry {name!r} is a {type(value).__name__}, not a tensor; only tensors can be saved")
            if value.is_sparse or value.is_quantized:
                raise FormatError(f"{label}: tensor {name!r} is sparse or quantized, which shardwise does not write")
            self._tensors[str(name)] = value

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        value = self._tensors[name]
        return TensorInfo(name, tuple(value.shape), dtype_name_of(value.dtype))

    def infos(self) -> list[TensorInfo]:
        return [self.info(name) for name in self._tensors]

    def stored(self, name: str) -> None:
        return None

    def read(self, name: str):
        return self._tensors[name].detach().to("cpu").contiguous()

    def close(self) -> None:
        pass
