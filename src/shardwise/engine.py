"""Executing conversion plans: stream every tensor from its source into its output file.

Memory stays bounded by one chunk, not one model or even one tensor:

- bytes that need no change are read into one of two 16 MiB buffers while a background thread
  writes the other (:class:`~shardwise.background.BackgroundWriter`), so reading, the CRC-32 that
  torch's zip members need, and writing overlap on two cores. (``os.copy_file_range`` was measured
  too: both formats put tensors at offsets that are not page-aligned, and the kernel copy was
  slower than this pipeline on the reference machine.)
- dtype casts run chunk by chunk through the same buffers;
- only tensors stored as strided views (rare, torch files only) are read whole before writing.

Every output is written in a staging path and committed atomically (:mod:`shardwise.atomic`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .atomic import atomic_output, fsync_file, write_all, write_text_durably
from .background import write_streaming
from .dtypes import dtype as dtype_row, parse_cast_dtype
from .errors import FormatError, OptionError
from .formats import Checkpoint, open_checkpoint
from .formats.hf import read_config
from .formats.hf_conventions import aliased_duplicates, finish_hf_folder, hf_json, ties_embeddings
from .formats.safetensors import check_writable, write_safetensors
from .formats.torch_pickle import write_torch
from .plan import OutputPlan, PlannedFile, PlannedTensor, infer_format, plan_output
from .progress import NO_PROGRESS, Progress
from .tensors import FileTensorSource, StoredTensor, TensorInfo, tensor_bytes
from .units import CHUNK_BYTES, parse_size
from .storage import accepts_urls

__all__ = ["convert", "ConvertResult", "TensorStreamer", "CHUNK_BYTES"]



@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote: the output path, its format, files (relative), tensors and bytes."""

    path: str
    format: str
    files: tuple[str, ...]
    num_tensors: int
    total_bytes: int
    seconds: float
    warnings: tuple[str, ...] = ()


class TensorStreamer:
    """Writes planned tensors from a file-backed source into output sinks, chunk by chunk.

    One instance per conversion; it owns one reusable buffer. Not thread-safe.
    """

    def __init__(self, source: FileTensorSource, progress: Progress = NO_PROGRESS) -> None:
        self.source = source
        self.progress = progress
        # two buffers, used in turn, so a BackgroundWriter may still be writing the previous chunk
        self._buffers = (memoryview(bytearray(CHUNK_BYTES)), memoryview(bytearray(CHUNK_BYTES)))
        self._turn = 0
        self._tiles = None  # a TileStreamer, for tensors saved in pieces

    def _tile_streamer(self, cast: str | None):
        """One streamer per conversion: built with its cast (which it applies to floating tensors only)."""
        from .layout.stream import TileStreamer

        if self._tiles is None or cast is not None and self._tiles.cast != cast:
            self._tiles = TileStreamer(self.source.lookup, self.progress, cast=cast)
        return self._tiles

    def _next_buffer(self) -> memoryview:
        self._turn ^= 1
        return self._buffers[self._turn]

    def write(self, planned: PlannedTensor, sink: BinaryIO) -> None:
        """Write ``planned.out.nbytes`` bytes of the tensor to ``sink``."""
        entry = self.source.stored(planned.source_name)
        if entry is None and hasattr(self.source, "tiled"):  # a tensor saved in pieces (DCP shards): streamed by bands of rows
            self._tile_streamer(planned.cast).write(self.source.tiled(planned.source_name), sink)
        elif entry is None or not entry.contiguous:
            self._write_materialized(planned, sink)
        elif planned.cast is None:
            self._copy(entry, sink)
        else:
            self._cast(entry, planned.cast, sink)

    def _copy(self, entry: StoredTensor, sink: BinaryIO) -> None:
        remaining, offset = entry.info.nbytes, entry.offset
        while remaining:
            buffer = self._next_buffer()
            n = min(remaining, len(buffer))
            chunk = buffer[:n]
            self.source.read_into(entry, offset, chunk)
            write_all(sink, chunk)
            remaining -= n
            offset += n
            self.progress.advance(n)

    def _cast(self, entry: StoredTensor, to: str, sink: BinaryIO) -> None:
        import torch

        src_dtype, dst_dtype = dtype_row(entry.info.dtype), dtype_row(to)
        per_chunk = CHUNK_BYTES // src_dtype.itemsize
        remaining, offset = entry.info.numel, entry.offset
        while remaining:
            count = min(remaining, per_chunk)
            chunk = self._next_buffer()[: count * src_dtype.itemsize]
            self.source.read_into(entry, offset, chunk)
            converted = torch.frombuffer(chunk, dtype=src_dtype.torch()).to(dst_dtype.torch())
            write_all(sink, tensor_bytes(converted))
            remaining -= count
            offset += len(chunk)
            self.progress.advance(count * dst_dtype.itemsize)

    def _write_materialized(self, planned: PlannedTensor, sink: BinaryIO) -> None:
        tensor = self.source.read(planned.source_name)
        if planned.cast is not None:
            tensor = tensor.to(dtype_row(planned.cast).torch())
        write_all(sink, tensor_bytes(tensor.contiguous()))
        self.progress.advance(planned.out.nbytes)


def write_tensor_file(sink: BinaryIO, kind: str, archive_name: str, infos: list[TensorInfo], write_tensor, metadata: dict[str, str]) -> None:
    """Write a weights file of ``kind`` (safetensors or torch) to the seekable ``sink``.

    ``write_tensor(info, out)`` is called once per tensor, in order, and writes its bytes;
    ``archive_name`` is the folder name inside a torch zip (torch uses the file's stem).
    """
    if kind == "safetensors":
        write_safetensors(sink, infos, write_tensor, metadata=metadata)
    else:
        write_torch(sink, archive_name, infos, write_tensor)


def write_weights(sink: BinaryIO, archive_name: str, planned_file: PlannedFile, streamer: TensorStreamer, metadata: dict[str, str]) -> None:
    """Write one planned weights file (safetensors or torch) to the seekable ``sink``, streaming."""
    by_name = {t.out.name: t for t in planned_file.tensors}

    def write_tensor(info: TensorInfo, out: BinaryIO) -> None:
        streamer.write(by_name[info.name], out)

    write_tensor_file(sink, planned_file.kind, archive_name, [t.out for t in planned_file.tensors], write_tensor, metadata)


def _write_file(path: Path, final_name: str, planned_file: PlannedFile, streamer: TensorStreamer, metadata: dict[str, str]) -> None:
    archive_name = os.path.splitext(final_name)[0] or "archive"
    write_streaming(path, lambda sink: write_weights(sink, archive_name, planned_file, streamer, metadata))


def write_index(path: Path, plan: OutputPlan) -> None:
    """The HF ``*.index.json`` of a sharded output plan, written durably, laid out as ``save_pretrained`` writes it.

    ``total_size`` is the bytes of the tensors written; ``total_parameters`` their elements (what
    transformers' ``num_parameters()`` gives unless the model also saves buffers).
    """
    index = {"metadata": {"total_parameters": plan.total_elements, "total_size": plan.total_bytes}, "weight_map": plan.weight_map()}
    write_text_durably(path, hf_json(index))


def _copy_companions(ckpt: Checkpoint, stage: Path, config: str | os.PathLike | None) -> list[str]:
    copied = []
    folder = Path(ckpt.path)
    for name in ckpt.companion_files if folder.is_dir() else ():
        if name == "config.json" and config is not None:
            continue
        shutil.copyfile(folder / name, stage / name)
        copied.append(name)
    if config is not None:
        shutil.copyfile(config, stage / "config.json")
        copied.append("config.json")
    for name in copied:
        fsync_file(stage / name)
    return copied


@accepts_urls(inputs=("src", "config", "hparams_file"), outputs=("dst",))
def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    config: str | os.PathLike | None = None,
    weights_format: str | None = None,
    hparams_file: str | os.PathLike | None = None,
    checkpoint_name: str | None = None,
    style: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
    qkv_linear: bool | None = None,
    fuse_qkv: bool | None = None,
    kv_multiplier: int | None = None,
    arch: str | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into ``dst``, streaming one tensor (chunk) at a time.

    ``to`` is ``safetensors``, ``torch``, ``hf`` or ``archive`` (default: from ``dst``'s suffix;
    archives are described in :func:`shardwise.archive.convert.convert_to_archive`, which takes
    ``weights_format``, ``hparams_file`` and ``checkpoint_name``). Without
    ``dtype`` the output tensors are bit-identical to the input's; with it (``bf16``, ``fp16``,
    ``fp32``) floating tensors are cast. ``max_shard_size`` (``"5GB"``, bytes) makes the output a
    folder of HF-named shards with an index. ``config`` supplies config.json for ``hf`` outputs
    (otherwise the source folder's is copied). ``dst`` must not exist unless ``overwrite``; it is
    written atomically. Raises :class:`~shardwise.errors.ShardwiseError` subclasses on bad input.

    Llama-family models also convert between parallel layouts (``to`` = ``nxdt``, ``nemo-dir``,
    ``archive`` or ``hf``; ``style``, ``tp``, ``pp``, ``qkv_linear``, ``fuse_qkv``,
    ``kv_multiplier``): see :func:`shardwise.reshard.convert.convert_layout`. CLIP models (HF
    ``CLIPModel`` folders, OpenCLIP folders, or an OpenCLIP state dict with ``arch``) convert to
    Megatron-core CLIP archives at ``tp`` and back: see :func:`shardwise.reshard.clip_convert.convert_clip`.

    >>> shardwise.convert("model.safetensors", "model.pt")  # doctest: +SKIP
    """
    started = time.perf_counter()
    dst = Path(dst)
    layout_options = {"style": style, "tp": tp, "pp": pp, "qkv_linear": qkv_linear, "fuse_qkv": fuse_qkv, "kv_multiplier": kv_multiplier}
    from .reshard.containers import Shards
    from .reshard.convert import convert_layout, layout_route

    layout_to = to or _suffix_format(dst)
    from .reshard.clip_convert import convert_if_clip

    unused = {"--max-shard-size": max_shard_size, "--config": config, "--hparams-file": hparams_file, "--checkpoint-name": checkpoint_name,
              "--qkv-linear": qkv_linear, "--fuse-qkv": fuse_qkv, "--kv-size-multiplier": kv_multiplier}
    clip = convert_if_clip(src, dst, to=layout_to, arch=arch, layout_options=any(layout_options[k] not in (None, False) for k in ("style", "tp", "pp")),
                           refused=unused, refused_in="conversions", tp=tp, pp=pp, style=style, dtype=dtype, weights_format=weights_format,
                           overwrite=overwrite, trust_pickle=trust_pickle, progress=progress)
    if clip is not None:
        return clip
    if layout_to == "dcp":
        for name, value in (("--weights-format", weights_format), ("--hparams-file", hparams_file), ("--checkpoint-name", checkpoint_name), ("--max-shard-size", max_shard_size), ("--config", config)):
            if value is not None:
                raise OptionError(f"{name} does not apply to --to dcp")
        if any(v not in (None, False) for v in layout_options.values()):
            raise OptionError("--to dcp writes whole tensors (torch reshards them at load); layout options do not apply")
        return _convert_to_dcp(src, dst, dtype=dtype, overwrite=overwrite, trust_pickle=trust_pickle, progress=progress, started=started)
    route = layout_route(src, layout_to, layout_options, trust_pickle=trust_pickle)
    if route is not None:
        for name, value in (("--hparams-file", hparams_file), ("--checkpoint-name", checkpoint_name)):
            if value is not None:
                if isinstance(route, Shards):
                    route.close()
                raise OptionError(f"{name} applies to Lightning checkpoints, not to parallel layouts")
        return convert_layout(
            route, dst, to=layout_to, **layout_options, config=config, dtype=dtype, weights_format=weights_format,
            max_shard_size=max_shard_size, overwrite=overwrite, trust_pickle=trust_pickle, progress=progress,
        )
    to = to or infer_format(str(dst))
    if to == "archive":
        if config is not None or max_shard_size is not None:
            raise OptionError("--config and --max-shard-size do not apply to archives (see --hparams-file)")
        from .archive.convert import convert_to_archive

        return convert_to_archive(
            src, dst, weights_format=weights_format, dtype=dtype, hparams_file=hparams_file, checkpoint_name=checkpoint_name,
            overwrite=overwrite, trust_pickle=trust_pickle, progress=progress,
        )
    for name, value in (("--weights-format", weights_format), ("--hparams-file", hparams_file), ("--checkpoint-name", checkpoint_name)):
        if value is not None:
            raise OptionError(f"{name} applies to --to archive only")
    cast = parse_cast_dtype(dtype) if dtype else None
    from .reshard.integrity import checked_while_read, files_of

    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    given_config = read_config(Path(config)) if config is not None else None  # refuse a bad config before writing anything
    with open_checkpoint(src, trust_pickle=trust_pickle) as ckpt, checked_while_read(files_of(ckpt)) as verdict:
        if ckpt.archive is not None:
            from .archive.convert import check_unsharded

            check_unsharded(ckpt, to)
        tied = _tied_duplicates(ckpt, given_config) if to == "hf" else {}
        plan = plan_output([i for i in ckpt.infos() if i.name not in tied], to=to, cast=cast, max_shard_size=limit)
        if config is not None and not plan.is_dir:
            raise OptionError(f"--config {config}: a config goes into a folder output; use --to hf or --max-shard-size")
        _check_writable(plan, dst)
        warnings = list(_warnings(ckpt, plan, config)) + _tied_warnings(ckpt, tied)
        metadata = {**ckpt.metadata, "format": "pt"}
        streamer = TensorStreamer(ckpt.tensors, progress)
        progress.start(plan.total_bytes, f"convert to {to}")
        try:
            with atomic_output(dst, is_dir=plan.is_dir, overwrite=overwrite) as stage:
                for planned_file in plan.files:
                    if plan.is_dir:
                        _write_file(stage / planned_file.relpath, planned_file.relpath, planned_file, streamer, metadata)
                    else:
                        _write_file(stage, dst.name, planned_file, streamer, metadata)
                if plan.index_name:
                    write_index(stage / plan.index_name, plan)
                if ckpt.archive is not None and plan.copy_companions:
                    from .archive.convert import export_hf_files

                    warnings += export_hf_files(ckpt.archive, stage)[1]
                if plan.copy_companions or config is not None:
                    _copy_companions(ckpt, stage, config)
                if plan.format == "hf":
                    finish_hf_folder(stage, cast=cast.name if cast else None)
                verdict()  # a source damaged under its manifest leaves nothing behind
        finally:
            progress.finish()
    files = tuple(f.relpath for f in plan.files) + ((plan.index_name,) if plan.index_name else ())
    return ConvertResult(
        str(dst), to, files, sum(len(f.tensors) for f in plan.files), plan.total_bytes, time.perf_counter() - started, tuple(warnings)
    )


def _convert_to_dcp(src, dst: Path, *, dtype, overwrite: bool, trust_pickle: bool, progress: Progress, started: float) -> ConvertResult:
    """``--to dcp``: the source's full tensors (sharded layouts merged lazily) as a one-file DCP folder."""
    from .formats.dcp_write import write_dcp_folder
    from .reshard.canonical import open_layout_checkpoint
    from .reshard.integrity import checked_while_read, files_of

    cast = parse_cast_dtype(dtype) if dtype else None
    view = open_layout_checkpoint(src, trust_pickle=trust_pickle) or open_checkpoint(src, trust_pickle=trust_pickle)
    with view, checked_while_read(files_of(view)) as verdict:
        if getattr(view, "archive", None) is not None:
            from .archive.convert import check_unsharded

            check_unsharded(view, "dcp")
        plan = plan_output([view.tensors.info(n) for n in view.tensors.keys()], to="torch", cast=cast)
        planned = {t.out.name: t for t in plan.files[0].tensors}
        streamer = TensorStreamer(view.tensors, progress)
        progress.start(plan.total_bytes, "convert to dcp")
        try:
            with atomic_output(dst, is_dir=True, overwrite=overwrite) as stage:
                files = write_dcp_folder(stage, [t.out for t in planned.values()], lambda info, out: streamer.write(planned[info.name], out))
                verdict()
        finally:
            progress.finish()
    return ConvertResult(str(dst), "dcp", tuple(files), len(planned), plan.total_bytes, time.perf_counter() - started)


def _suffix_format(dst: Path) -> str | None:
    try:
        return infer_format(str(dst))
    except OptionError:
        return None


def _check_writable(plan: OutputPlan, dst: Path) -> None:
    """Refuse, before anything is staged, outputs the target format cannot represent."""
    for planned_file in plan.files:
        if planned_file.kind == "safetensors":
            try:
                check_writable([t.out for t in planned_file.tensors])
            except FormatError as e:
                raise FormatError(f"{dst}: cannot write safetensors: {e}") from None


def _tied_duplicates(ckpt: Checkpoint, given_config: dict | None) -> dict[str, str]:
    """Tensors an HF output writes once (see :func:`~.formats.hf_conventions.aliased_duplicates`).

    Only when an HF config is known (``--config`` or the folder's) and ties the word embeddings:
    from_pretrained restores a dropped tied weight from its config, and from nothing else.
    """
    hf_config = given_config if given_config is not None else ckpt.config if ckpt.format == "hf" else None
    if hf_config is None or not ties_embeddings(hf_config):
        return {}
    return aliased_duplicates((name, ckpt.tensors.stored(name)) for name in ckpt.tensors.keys())


def _tied_warnings(ckpt: Checkpoint, tied: dict[str, str]) -> list[str]:
    if not tied:
        return []
    pairs = ", ".join(f"{dup} (= {kept})" for dup, kept in tied.items())
    return [f"{ckpt.path}: tied weights written once, as save_pretrained does (from_pretrained ties them again): {pairs}"]


def _warnings(ckpt: Checkpoint, plan: OutputPlan, config: str | os.PathLike | None) -> tuple[str, ...]:
    if plan.format == "hf" and config is None and "config.json" not in ckpt.companion_files and ckpt.archive is None:
        return (f"{ckpt.path}: has no config.json, so the HF folder will hold weights only; pass --config to add one",)
    return ()
