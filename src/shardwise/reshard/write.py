"""Writing a planned model into a container: nxdt folders, archives, unpacked archives, HF folders.

Every tensor is streamed by a :class:`~shardwise.layout.stream.TileStreamer` straight from the
source shards; outputs are staged and committed atomically, with ``shardwise.json`` written last.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, Callable

from ..archive.folder_writer import FILE_LANES, FolderWriter
from ..archive.layout import MANIFEST_NAME
from ..archive.manifest import MANIFEST_FORMAT, MANIFEST_VERSION
from ..archive.writer import ArchiveShard, write_archive
from ..atomic import atomic_output
from ..background import write_streaming
from ..engine import write_index, write_tensor_file
from ..formats.xser import xser_files
from ..jsonfile import document_bytes
from ..layout.stream import TileStreamer
from ..layout.tiles import TiledTensor
from ..plan import plan_output
from ..progress import SerialProgress
from ..tensors import TensorInfo
from .containers import nxdt_file_name

__all__ = ["out_infos", "write_nxdt", "write_nemo", "write_hf", "parallel_manifest"]

Shard = tuple[int, int]


def out_infos(tensors: list[TiledTensor], streamer: TileStreamer) -> list[TensorInfo]:
    """The tensors as written (the streamer's cast applied)."""
    return [TensorInfo(t.info.name, t.info.shape, streamer.out_dtype(t.info.dtype)) for t in tensors]


def _writer_for(tensors: list[TiledTensor], streamer: "TileStreamer | _StreamerPerThread"):
    by_name = {t.info.name: t for t in tensors}

    def write(info: TensorInfo, out: BinaryIO) -> None:
        streamer.write(by_name[info.name], out)

    return write


class _StreamerPerThread:
    """``streamer`` on the thread that made this, a twin of it (own buffers) on any other thread:
    for files written concurrently. The twins report to a progress object calls are serialised to."""

    def __init__(self, streamer: TileStreamer) -> None:
        self._template = streamer
        self._owner = threading.get_ident()
        self._local = threading.local()
        self._progress = SerialProgress(streamer.progress)

    def current(self) -> TileStreamer:
        if threading.get_ident() == self._owner:
            return self._template
        mine = getattr(self._local, "streamer", None)
        if mine is None:
            mine = self._local.streamer = self._template.twin(self._progress)
        return mine

    def write(self, tensor: TiledTensor, sink: BinaryIO) -> None:
        self.current().write(tensor, sink)


def parallel_manifest(container: str, layout, dims, hf_config: dict, encoding: str, generation_config: dict | None = None) -> dict:
    """The ``parallel`` entry of ``shardwise.json``: everything needed to read the shards back without flags.

    ``generation_config`` (the source's generation_config.json, for containers that hold weights
    only) is kept so that converting back to HF restores it.
    """
    parallel = {
        "container": container,
        "encoding": encoding,
        "layout": layout.as_dict(),
        "stages": [{"pp_rank": p, "layers": list(range(first, first + count))} for p, (first, count) in enumerate(layout.stages)],
        "dims": dims.as_dict(),
        "config": hf_config,
    }
    if generation_config is not None:
        parallel["generation_config"] = generation_config
    return parallel


def write_nxdt(
    dst: Path, plan: dict[Shard, list[TiledTensor]], streamer: TileStreamer, parallel: dict, *, overwrite: bool, encoding: str = "torch",
    before_commit: Callable[[], None] | None = None,
) -> list[str]:
    """``dst/model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt`` per shard (flat dicts, as NxD writes) and ``dst/shardwise.json``.

    ``encoding`` ``xser`` writes each shard as NxD's ``save_xser`` does: a reference file, its
    ``.pt.tensors/tensor_<i>.pt`` files and ``.pt.info.pt``. ``before_commit()`` runs when
    everything is written and may raise to discard it (the source's CRC verdict).
    """
    from .. import __version__

    total = sum(i.nbytes for tensors in plan.values() for i in out_infos(tensors, streamer))
    streamer.progress.start(total, "write nxdt shards")
    try:
        with atomic_output(dst, is_dir=True, overwrite=overwrite) as stage:
            writer = FolderWriter(stage)
            writer.add_dir("model")
            per_thread = _StreamerPerThread(streamer)
            files = []
            for (tp_rank, pp_rank), tensors in sorted(plan.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                name = nxdt_file_name(tp_rank, pp_rank)
                infos, write = out_infos(tensors, streamer), _writer_for(tensors, per_thread)
                if encoding == "xser":
                    files += [(planned.relpath, planned.produce) for planned in xser_files(f"model/{name}", infos, write)]
                else:
                    files.append((f"model/{name}", lambda sink, infos=infos, write=write, name=name: write_tensor_file(sink, "torch", name[:-3], infos, write, {})))
            writer.add_streams(files, lanes=FILE_LANES)
            document = {
                "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "created_by": f"shardwise {__version__}",
                "parallel": parallel,
                "members": [{"name": m.name, "size": m.size, "crc32": f"{m.crc32:08x}"} for m in writer.members],
            }
            writer.add_bytes(MANIFEST_NAME, document_bytes(document))
            writer.close()
            if before_commit is not None:
                before_commit()
    finally:
        streamer.progress.finish()
    return [m.name for m in writer.members]


def write_nemo(
    dst: Path, plan: dict[Shard, list[TiledTensor]], streamer: TileStreamer, *, config: dict, artifacts, tp: int, pp: int,
    parallel: dict, weights_format: str, unpacked: bool, overwrite: bool, before_commit: Callable[[], None] | None = None,
) -> list[str]:
    """An archive (or, ``unpacked``, a nemo-dir folder) with NeMo's rank folders and a manifest carrying ``parallel``;
    ``before_commit``: see :func:`write_nxdt`."""
    per_thread = _StreamerPerThread(streamer)
    shards = [ArchiveShard(t, p, tuple(out_infos(tensors, streamer)), _writer_for(tensors, per_thread)) for (t, p), tensors in plan.items()]
    written = write_archive(
        dst, config=config, shards=shards, tp=tp, pp=pp, weights_format=weights_format, artifacts=artifacts,
        overwrite=overwrite, progress=streamer.progress, unpacked=unpacked, manifest_extra={"parallel": parallel}, lanes=FILE_LANES,
        before_commit=before_commit,
    )
    return [m.name for m in written]


def write_hf(
    dst: Path, tensors: list[TiledTensor], streamer: TileStreamer, *, add_files, overwrite: bool, max_shard_size: int | None = None,
    single_file: str | None = None, xser: bool = False, before_commit: Callable[[], None] | None = None,
) -> list[str]:
    """An HF folder: safetensors shards named and indexed as ``save_pretrained`` does, then ``add_files(stage)``.

    ``single_file`` writes all tensors to one torch file of that name instead (NxD's ``checkpoint.pt``),
    with ``xser`` as an xser reference file plus its tensor files. ``before_commit``: see :func:`write_nxdt`.
    """
    infos = out_infos(tensors, streamer)
    plan = plan_output(infos, to="hf", max_shard_size=max_shard_size)
    if single_file:
        only = plan_output(infos, to="torch").files[0]
        plan = replace(plan, files=(replace(only, relpath=single_file),), index_name=None)
    by_name = {t.info.name: t for t in tensors}
    streamer.progress.start(plan.total_bytes, "write hf")
    try:
        with atomic_output(dst, is_dir=True, overwrite=overwrite) as stage:
            if xser:
                written = _write_xser_file(stage, single_file, infos, _writer_for(tensors, streamer)) + list(add_files(stage))
                if before_commit is not None:
                    before_commit()
                return written
            for planned in plan.files:
                file_infos = [p.out for p in planned.tensors]
                write = _writer_for([by_name[i.name] for i in file_infos], streamer)
                write_streaming(stage / planned.relpath, lambda sink, file_infos=file_infos, write=write, planned=planned: write_tensor_file(
                    sink, planned.kind, planned.relpath.rsplit(".", 1)[0], file_infos, write, {"format": "pt"}))
            if plan.index_name:
                write_index(stage / plan.index_name, plan)
            extra = add_files(stage)
            if before_commit is not None:
                before_commit()
    finally:
        streamer.progress.finish()
    return [f.relpath for f in plan.files] + ([plan.index_name] if plan.index_name else []) + list(extra)


def _write_xser_file(stage: Path, relpath: str, infos: list[TensorInfo], write) -> list[str]:
    written = []
    for planned in xser_files(relpath, infos, write):
        (stage / planned.relpath).parent.mkdir(parents=True, exist_ok=True)
        write_streaming(stage / planned.relpath, planned.produce)
        written.append(planned.relpath)
    return written
