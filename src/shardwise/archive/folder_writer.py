"""Writing an archive's members into a folder instead of a tar (NeMo's unpacked form, ``nemo-dir``).

:class:`FolderWriter` has :class:`~shardwise.archive.tar_writer.TarWriter`'s interface, so the
same code writes either form. Each file is streamed through a background writer, its CRC-32
computed on the way (patched algebraically where a zip writer seeks back). Files are fsynced
together by :meth:`FolderWriter.close`, so the kernel writes one file back while the next is
being produced (fsyncing each file as it is finished stalled the pipeline for the writeback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..atomic import fsync_dir, fsync_file
from ..background import write_streaming
from ..errors import FormatError
from .tar_writer import MemberSink, MemberWriter, WrittenMember

__all__ = ["FolderWriter"]


class FolderWriter(MemberWriter):
    """Writes members as files under ``root`` (which must exist). ``members`` lists files in order; offsets are 0."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.members: list[WrittenMember] = []
        self._names: set[str] = set()
        self._unsynced: list[Path] = []

    def _path(self, name: str) -> Path:
        if name in self._names:
            raise FormatError(f"member {name!r} written twice")
        self._names.add(name)
        return self.root / name

    def add_dir(self, name: str) -> None:
        self._path(name + "/").mkdir(parents=True, exist_ok=True)

    def add_stream(self, name: str, produce: Callable[[MemberSink], None]) -> WrittenMember:
        """Create file ``name`` whose bytes ``produce(sink)`` writes; returns its size and CRC-32."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        sinks: list[MemberSink] = []

        def fill(background) -> None:
            sinks.append(MemberSink(background, 0))
            produce(sinks[0])

        write_streaming(path, fill, mode="w+b", sync=False)  # fsynced together by close()
        sink = sinks[0]
        self._unsynced.append(path)
        member = WrittenMember(name, sink.size, 0, sink.crc)
        self.members.append(member)
        return member

    def close(self) -> None:
        """Make every file written, and every folder that holds them, durable (fsync).

        The caller's atomic commit syncs the root's parent; sub-folders (``model/``, xser's
        ``.tensors/``) are synced here, so no file written can vanish from its folder in a crash.
        """
        folders = {path.parent for path in self._unsynced}
        for path in self._unsynced:
            fsync_file(path)
        self._unsynced.clear()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
