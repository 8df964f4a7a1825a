"""Overlapping computation with writing: a file whose large writes run on a background thread.

Writing a torch zip member costs a CRC-32 of every byte and then a ``write``. Both release the GIL,
so with two cores they can run at once: while the kernel copies chunk k into the page cache, the
caller reads and checksums chunk k+1. :class:`BackgroundWriter` provides exactly that, with at
most one write in flight, which keeps the memory bound at two chunks. After each write the kernel
is asked to start writing those pages to disk (``sync_file_range``), so the fsync that makes the
file durable at the end waits for little more than the last chunk.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from .atomic import durable_close, start_writeback, write_all

__all__ = ["BackgroundWriter", "write_streaming", "write_small"]


class BackgroundWriter(io.RawIOBase):
    """A seekable, write-only file that writes large buffers on a background thread.

    Contract: ``write(data)`` first waits for the previous background write; then data of at
    least ``threshold`` bytes starts being written in the background and the call returns at once,
    while smaller data is copied into a pending buffer (written, in order, ahead of the next
    background write, or on its own once it reaches ``threshold``). The caller must not modify
    ``data`` until its next call on this object other than :meth:`write_copy` and :meth:`tell`,
    so a caller streaming through reused buffers alternates between two of them.

    :meth:`write_copy` is for small bytes the writer builds itself (a zip or tar header between
    two tensors): they are copied into the pending buffer without waiting for the write in flight,
    so producing the next tensor overlaps with writing the last one. ``tell()`` is the logical
    position (every byte given so far) and never waits. An error raised by a background write is
    raised by the next call that waits. The wrapped file stays open after ``close()``; not
    thread-safe beyond that one background write.
    """

    def __init__(self, f: BinaryIO, *, threshold: int = 1 << 20) -> None:
        super().__init__()
        self._f = f
        self._threshold = threshold
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending = bytearray()  # small writes not yet handed to the file
        try:
            self._fd: int | None = f.fileno()
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
            self._fd = None
        try:
            self._position = f.tell()
        except (OSError, ValueError, AttributeError):
            self._position = 0

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _drain(self) -> None:
        """Wait for the write in flight, then write the pending small writes: the file holds every byte given."""
        self._wait()
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            write_all(self._f, pending)

    def _write_in_background(self, pieces: tuple) -> None:
        try:
            offset = os.lseek(self._fd, 0, os.SEEK_CUR) if self._fd is not None else None
            for piece in pieces:
                write_all(self._f, piece)
            if offset is not None:
                start_writeback(self._fd, offset, sum(len(p) for p in pieces))  # so the final fsync finds little left to write
        except BaseException as e:  # handed to the caller at its next waiting call
            self._error = e

    def _start(self, view: memoryview | None) -> None:
        self._wait()
        pieces = tuple(p for p in (self._pending, view) if p)
        self._pending = bytearray()
        self._position += len(view) if view is not None else 0
        self._thread = threading.Thread(target=self._write_in_background, args=(pieces,), daemon=True)
        self._thread.start()

    def write(self, data) -> int:
        self._wait()  # the caller may reuse the buffer of the write in flight once this returns
        view = memoryview(data).cast("B")
        if len(view) >= self._threshold:
            self._start(view)
        else:
            self._queue(view)
        return len(view)

    def write_copy(self, data) -> int:
        """Append a copy of ``data`` without waiting for the write in flight (which keeps the caller's
        earlier buffer in use until the next :meth:`write` or waiting call). It waits only when the
        pending buffer is full."""
        view = memoryview(data).cast("B")
        self._queue(view)
        return len(view)

    def _queue(self, view: memoryview) -> None:
        self._pending += view
        self._position += len(view)
        if len(self._pending) >= self._threshold:
            self._start(None)

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._drain()
        self._position = self._f.seek(offset, whence)
        return self._position

    def flush(self) -> None:
        self._drain()
        self._f.flush()

    def fileno(self) -> int:
        """The wrapped file's descriptor, once every byte given is written (for reading them back)."""
        self._drain()
        return self._f.fileno()

    def abort(self) -> None:
        """Wait until no write is in flight, whatever happens meanwhile; drop pending bytes and any write error.

        For cleanup paths: even a KeyboardInterrupt during the wait does not leave the thread
        writing into a file that the caller is about to close (the interrupt is re-raised after).
        """
        interrupted: BaseException | None = None
        while self._thread is not None and self._thread.is_alive():
            try:
                self._thread.join()
            except BaseException as e:  # noqa: BLE001 - remembered and re-raised below
                interrupted = e
        self._thread, self._error, self._pending = None, None, bytearray()
        if not self.closed:
            super().close()
        if interrupted is not None:
            raise interrupted

    def close(self) -> None:
        if not self.closed:
            try:
                self._drain()
            finally:
                super().close()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False


def write_small(f: BinaryIO, data) -> None:
    """Write small bytes the caller built itself (a header): through ``f.write_copy`` where ``f`` has
    one (a :class:`BackgroundWriter`, or a sink forwarding to one), so the write in flight is not
    waited for; any other file gets a plain write."""
    forward = getattr(f, "write_copy", None)
    if forward is not None:
        forward(data)
    else:
        write_all(f, data)


def write_streaming(path: Path, produce: Callable[[BackgroundWriter], None], *, mode: str = "wb", sync: bool = True) -> None:
    """Create ``path`` and let ``produce(sink)`` fill it through a :class:`BackgroundWriter`, then fsync
    (unless ``sync`` is false: the caller fsyncs later, as a folder writer does for all its files at once).

    Each write overlaps with reading (and checksumming) the next chunk. On any error no write is
    left running and the file is closed (the caller's atomic staging removes it).
    """
    f = open(path, mode, buffering=0)
    background = BackgroundWriter(f)
    try:
        produce(background)
        background.close()  # waits for the last write and raises its error, if any
    except BaseException:
        try:
            background.abort()  # no write may still be running when the file is closed
        finally:
            f.close()
        raise
    if sync:
        durable_close(f)
    else:
        f.close()
