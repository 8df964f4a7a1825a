"""Writing an archive in NeMo's layout, streaming each rank's weights straight into the tar.

Member order: the root ``.``, ``model_config.yaml``, artifacts, then each rank's weights
(``model_weights.ckpt`` at the root, or in ``mp_rank_XX/`` / ``tp_rank_XX_pp_rank_XXX/``), and
the shardwise manifest last. The archive is staged and committed atomically, so a crash or bad
input never leaves a partial archive at the destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import yaml

from ..atomic import atomic_output
from ..background import write_streaming
from ..engine import TensorStreamer, write_tensor_file
from ..errors import OptionError
from ..plan import PlannedFile
from ..progress import NO_PROGRESS, Progress
from ..tensors import TensorInfo
from .artifacts import PlannedArtifact
from .folder_writer import FolderWriter
from .layout import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAMES, ArchiveLayout, rank_folder
from .manifest import manifest_bytes
from .tar_writer import TarWriter, WrittenMember

__all__ = ["ArchiveShard", "planned_shards", "write_archive", "config_yaml", "WEIGHTS_MEMBER"]

WEIGHTS_MEMBER = {kind: name for name, kind in WEIGHTS_NAMES.items()}  # weights format -> member name


@dataclass(frozen=True)
class ArchiveShard:
    """One rank's weights: the tensors (as written) and ``write_tensor(info, out)``, which streams one."""

    tp_rank: int
    pp_rank: int
    infos: tuple[TensorInfo, ...]
    write_tensor: Callable[[TensorInfo, BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)


def planned_shards(items: list[tuple[int, int, object, PlannedFile]], progress: Progress = NO_PROGRESS) -> list[ArchiveShard]:
    """Shards whose tensors are copied (or cast) from a source by plan; one pair of buffers for all."""
    streamer: TensorStreamer | None = None
    shards = []
    for tp_rank, pp_rank, source, planned in items:
        streamer = streamer or TensorStreamer(source, progress)
        by_name = {t.out.name: t for t in planned.tensors}

        def write(info: TensorInfo, out: BinaryIO, source=source, by_name=by_name) -> None:
            streamer.source = source
            streamer.write(by_name[info.name], out)

        shards.append(ArchiveShard(tp_rank, pp_rank, tuple(t.out for t in planned.tensors), write))
    return shards


def config_yaml(config: dict, label: str = "config") -> bytes:
    """``config`` as YAML, keys in their given order; OptionError for values YAML cannot hold."""
    try:
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)
    except yaml.YAMLError as e:
        raise OptionError(f"{label}: cannot be written as YAML ({str(e).splitlines()[0]}); use plain dicts, lists, strings and numbers") from None
    return text.encode("utf-8")


def _add_artifact(tar: TarWriter, artifact: PlannedArtifact) -> None:
    if not artifact.is_dir:
        tar.add_file(artifact.member, artifact.entries[0][1])
        return
    folders = {""}
    tar.add_dir(artifact.member)
    for relname, path in artifact.entries:
        parts = relname.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder not in folders:
                folders.add(folder)
                tar.add_dir(f"{artifact.member}/{folder}")
        tar.add_file(f"{artifact.member}/{relname}", path)


def write_archive(
    dst: Path,
    *,
    config: dict,
    shards: list[ArchiveShard],
    tp: int = 1,
    pp: int = 1,
    weights_format: str = "torch",
    artifacts: list[PlannedArtifact] = (),
    overwrite: bool = False,
    progress: Progress = NO_PROGRESS,
    unpacked: bool = False,
    manifest_extra: dict | None = None,
    lanes: int = 1,
    before_commit: Callable[[], None] | None = None,
) -> list[WrittenMember]:
    """Write the archive ``dst`` atomically; returns the regular members written (with CRC-32s).

    ``shards`` holds one entry per (tp_rank, pp_rank) of the TP x PP grid; their tensors are
    streamed chunk by chunk, so memory stays bounded by the engine's buffers. ``unpacked``
    writes the same members into a folder (NeMo's extracted form) instead of a tar.
    ``manifest_extra`` adds top-level entries (such as ``parallel``) to ``shardwise.json``.
    ``lanes`` > 1 writes that many rank files of an unpacked archive at once
    (:meth:`~shardwise.archive.folder_writer.FolderWriter.add_streams`): every shard's
    ``write_tensor`` must then be safe to call from several threads. ``before_commit()`` runs when
    everything is written and may raise to discard it (a conversion's check of its source).
    """
    if weights_format not in WEIGHTS_MEMBER:
        raise OptionError(f"weights format {weights_format!r}: choose torch (model_weights.ckpt, NeMo's default) or safetensors")
    if sorted((s.tp_rank, s.pp_rank) for s in shards) != [(t, p) for t in range(tp) for p in range(pp)]:
        raise OptionError(f"{dst}: the shards given do not form a TP={tp} x PP={pp} grid")
    config_bytes = config_yaml(config, f"{dst}: {CONFIG_NAME}")
    weights_name = WEIGHTS_MEMBER[weights_format]
    members = {(s.tp_rank, s.pp_rank): "/".join(filter(None, [rank_folder(s.tp_rank, s.pp_rank, tp, pp), weights_name])) for s in shards}
    layout = ArchiveLayout("single" if tp * pp == 1 else "sharded", tp, pp, weights_format, members)

    def fill(writer) -> None:
        writer.add_dir("")
        writer.add_bytes(CONFIG_NAME, config_bytes)
        for artifact in artifacts:
            _add_artifact(writer, artifact)
        streams = []
        for shard in sorted(shards, key=lambda s: (s.pp_rank, s.tp_rank)):
            folder = rank_folder(shard.tp_rank, shard.pp_rank, tp, pp)
            if folder:
                writer.add_dir(folder)
            stream = (members[(shard.tp_rank, shard.pp_rank)], lambda member, shard=shard: write_tensor_file(
                member, weights_format, "model_weights", list(shard.infos), shard.write_tensor, {"format": "pt"}))
            if unpacked:
                streams.append(stream)  # folders first, then the files, several at once
            else:
                writer.add_stream(*stream)  # a tar holds each folder's entry right before its file
        if streams:
            writer.add_streams(streams, lanes=lanes)
        writer.add_bytes(MANIFEST_NAME, manifest_bytes(writer.members, layout.as_dict(), manifest_extra))
        writer.close()
        written.extend(writer.members)

    written: list[WrittenMember] = []
    progress.start(sum(s.nbytes for s in shards), "write archive")
    try:
        with atomic_output(dst, is_dir=unpacked, overwrite=overwrite) as stage:
            if unpacked:
                fill(FolderWriter(stage))
            else:
                write_streaming(stage, lambda sink: fill(TarWriter(sink)), mode="w+b")
            if before_commit is not None:
                before_commit()
    finally:
        progress.finish()
    return written
