"""Writing a PyTorch distributed checkpoint (DCP) folder that ``torch.distributed.checkpoint.load`` reads.

The folder is what one process calling ``torch.distributed.checkpoint.save(state_dict)`` writes:
``__0_0.distcp`` holds one ``torch.save`` zip per tensor, back to back (each tensor one chunk,
so ranks of any world size load their slices of it), and ``.metadata`` pickles torch's own
``Metadata`` (keys as the source names them, flat, as ``model.state_dict()`` has them). The zips
are streamed by shardwise's zip writer, one tensor at a time, so memory stays at a chunk.

Writing the metadata imports ``torch.distributed.checkpoint`` to pickle its classes: the file is
then exactly what torch's loader expects, whatever the torch version reading it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import BinaryIO, Callable

from ..tensors import TensorInfo
from .dcp import METADATA
from .torch_pickle import TensorStub, stub_pickle, write_torch_archive

__all__ = ["DATA_FILE", "write_dcp_folder"]

DATA_FILE = "__0_0.distcp"
DCP_VERSION = "1.0.0"


class _Embedded(io.RawIOBase):
    """A file seen from ``base`` on: a zip written through it records offsets relative to its own start,
    as ``torch.save`` into a DCP data file does (torch reads each zip through a view of its bytes)."""

    def __init__(self, f: BinaryIO, base: int) -> None:
        super().__init__()
        self._f, self._base = f, base

    def write(self, data) -> int:
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell() - self._base

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET:
            raise io.UnsupportedOperation("only absolute seeks")
        return self._f.seek(self._base + offset) - self._base

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def write_tensor_zips(sink: BinaryIO, infos: list[TensorInfo], write_tensor: Callable[[TensorInfo, BinaryIO], None]) -> list[tuple[int, int]]:
    """Write one ``torch.save`` zip per tensor to ``sink`` (seekable); return each zip's (offset, length)."""
    ranges = []
    for info in infos:
        start = sink.tell()
        write_torch_archive(
            _Embedded(sink, start), "archive", stub_pickle(TensorStub("0", info)),
            [(info.nbytes, lambda out, info=info: write_tensor(info, out))],
        )
        ranges.append((start, sink.tell() - start))
    return ranges


def metadata_pickle(infos: list[TensorInfo], ranges: list[tuple[int, int]]) -> bytes:
    """``.metadata`` for whole tensors stored at ``ranges`` of :data:`DATA_FILE`, pickled with torch's classes."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata

    from ..dtypes import dtype as dtype_row

    state, storage = {}, {}
    for info, (offset, length) in zip(infos, ranges):
        origin = torch.Size([0] * len(info.shape))
        state[info.name] = TensorStorageMetadata(
            TensorProperties(dtype=dtype_row(info.dtype).torch()), torch.Size(info.shape), [ChunkStorageMetadata(origin, torch.Size(info.shape))],
        )
        storage[MetadataIndex(info.name, origin)] = _StorageInfo(DATA_FILE, offset, length)
    metadata = Metadata(state, planner_data={info.name: (info.name,) for info in infos}, storage_data=storage, version=DCP_VERSION)
    return pickle.dumps(metadata)


def write_dcp_folder(stage: Path, infos: list[TensorInfo], write_tensor: Callable[[TensorInfo, BinaryIO], None]) -> list[str]:
    """Write the DCP files into the (staging) folder ``stage``; return their names. Files are fsynced."""
    from ..atomic import write_text_durably
    from ..background import write_streaming

    ranges: list[tuple[int, int]] = []
    write_streaming(stage / DATA_FILE, lambda sink: ranges.extend(write_tensor_zips(sink, infos, write_tensor)))
    write_text_durably(stage / METADATA, metadata_pickle(infos, ranges))
    return [DATA_FILE, METADATA]
