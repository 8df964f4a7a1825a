"""Writing an archive's members into a folder instead of a tar (NeMo's unpacked form, ``nemo-dir``).

:class:`FolderWriter` has :class:`~shardwise.archive.tar_writer.TarWriter`'s interface, so the
same code writes either form. Each file is streamed through a background writer, its CRC-32
computed on the way (patched algebraically where a zip writer seeks back). Files are fsynced
together by :meth:`FolderWriter.close`, so the kernel writes one file back while the next is
being produced (fsyncing each file as it is finished stalled the pipeline for the writeback).
:meth:`FolderWriter.add_streams` writes several files at once, one per thread: with two cores,
one file's page-cache copy runs beside the other's gathering and checksumming.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from ..atomic import fsync_dir, fsync_file
from ..background import write_streaming
from ..errors import FormatError, ShardwiseError
from .tar_index import member_path
from .tar_writer import MemberSink, MemberWriter, WrittenMember

__all__ = ["FolderWriter", "FILE_LANES"]

def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on (containers, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


FILE_LANES = max(1, min(4, _usable_cpus()))  # files add_streams writes at once: one per usable core, at most four


class FolderWriter(MemberWriter):
    """Writes members as files under ``root`` (which must exist). ``members`` lists files in the order
    they were added (for :meth:`add_streams`, the order given); offsets are 0.

    ``add_stream`` may run on several threads at once (as :meth:`add_streams` runs it); the other
    methods are for one thread.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.members: list[WrittenMember] = []
        self._names: set[str] = set()
        self._unsynced: list[Path] = []
        self._lock = threading.Lock()

    def _path(self, name: str, *, folder: bool = False) -> Path | None:
        """Where member ``name`` goes, resolved under ``root`` (:func:`member_path`); None for the
        root folder itself. FormatError for a name given twice or one that could leave ``root``."""
        with self._lock:
            key = name + "/" if folder else name
            if key in self._names:
                raise FormatError(f"member {name!r} written twice")
            self._names.add(key)
        if folder and not name:
            return None
        return member_path(self.root, name, str(self.root), folder=folder)

    def add_dir(self, name: str) -> None:
        path = self._path(name, folder=True)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)

    def add_stream(self, name: str, produce: Callable[[MemberSink], None]) -> WrittenMember:
        """Create file ``name`` whose bytes ``produce(sink)`` writes; returns its size and CRC-32."""
        return self._add(name, produce, None)

    def _add(self, name: str, produce: Callable[[MemberSink], None], cancelled: threading.Event | None) -> WrittenMember:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        sinks: list[MemberSink] = []

        def fill(background) -> None:
            sinks.append(MemberSink(background, 0) if cancelled is None else _CancellableSink(background, 0, cancelled))
            produce(sinks[0])

        write_streaming(path, fill, mode="w+b", sync=False)  # fsynced together by close()
        sink = sinks[0]
        member = WrittenMember(name, sink.size, 0, sink.crc)
        with self._lock:
            self._unsynced.append(path)
            self.members.append(member)
        return member

    def add_streams(self, streams: list[tuple[str, Callable[[MemberSink], None]]], *, lanes: int = FILE_LANES) -> list[WrittenMember]:
        """``add_stream(name, produce)`` for each pair, up to ``lanes`` files at once; returns their
        members in the order given (``members`` gets them in that order too).

        Each ``produce`` runs on its own thread, so it must not share unsynchronised state (such
        as a streamer's reusable buffers) with another. On the first error no further file is
        started, the files being written stop at their next write, and the error is raised (a
        KeyboardInterrupt likewise); the caller's staging removes what was written.
        """
        if lanes <= 1 or len(streams) <= 1:
            return [self.add_stream(name, produce) for name, produce in streams]
        before = len(self.members)
        cancelled = threading.Event()  # this call's: a later call on the writer starts afresh
        futures = []
        with ThreadPoolExecutor(lanes, thread_name_prefix="shardwise-file") as pool:
            try:
                for name, produce in streams:
                    futures.append(pool.submit(self._add_in_lane, name, produce, cancelled))
                for future in as_completed(futures):
                    if future.exception() is not None:
                        break
            finally:
                if len(futures) < len(streams) or not all(f.done() for f in futures) or any(f.exception() is not None for f in futures):
                    cancelled.set()  # a file failed, or the caller was interrupted
                    for future in futures:
                        future.cancel()
        # leaving the block waited for the files in progress, which stopped at their next write
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _WritingCancelled)), errors[0])
        written = [future.result() for future in futures]
        self.members[before:] = written
        return written

    def _add_in_lane(self, name: str, produce: Callable[[MemberSink], None], cancelled: threading.Event) -> WrittenMember:
        if cancelled.is_set():
            raise _WritingCancelled(f"{name}: not started: another file being written failed")
        try:
            return self._add(name, produce, cancelled)
        except BaseException:
            cancelled.set()  # before this lane takes the next file
            raise

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


class _WritingCancelled(ShardwiseError):
    """A file stopped because another file written beside it failed."""


class _CancellableSink(MemberSink):
    """A member sink that stops at its next write once ``cancelled`` is set."""

    def __init__(self, f, start: int, cancelled: threading.Event) -> None:
        super().__init__(f, start)
        self._cancelled = cancelled

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise _WritingCancelled("stopped: another file being written failed")

    def _write(self, data, piece_crc: int | None, small: bool) -> int:
        self._check()
        return super()._write(data, piece_crc, small)
