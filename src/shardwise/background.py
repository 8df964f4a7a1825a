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

__all__ = ["BackgroundWriter", "write_streaming"]


class BackgroundWriter(io.RawIOBase):
    """A seekable, write-only file that writes large buffers on a background thread.

    Contract: ``write(data)`` first waits for the previous background write, then starts writing
    ``data`` and returns at once. The caller must not modify ``data`` until its next call on this
    object (write, tell, seek, flush, close), so a caller streaming through a reused buffer
    alternates between two buffers. Writes smaller than ``threshold`` are done synchronously. An
    error raised by a background write is raised by the next call. The wrapped file stays open
    after ``close()``; not thread-safe beyond that one background write.
    """

    def __init__(self, f: BinaryIO, *, threshold: int = 1 << 20) -> None:
        super().__init__()
        self._f = f
        self._threshold = threshold
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        try:
            self._fd: int | None = f.fileno()
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
            self._fd = None

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_in_background(self, view: memoryview) -> None:
        try:
            offset = os.lseek(self._fd, 0, os.SEEK_CUR) if self._fd is not None else None
            write_all(self._f, view)
            if offset is not None:
                start_writeback(self._fd, offset, len(view))  # so the final fsync finds little left to write
        except BaseException as e:  # handed to the caller at its next call
            self._error = e

    def write(self, data) -> int:
        self._wait()
        view = memoryview(data).cast("B")
        if len(view) < self._threshold:
            write_all(self._f, view)
        else:
            self._thread = threading.Thread(target=self._write_in_background, args=(view,), daemon=True)
            self._thread.start()
        return len(view)

    def tell(self) -> int:
        self._wait()
        return self._f.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._wait()
        return self._f.seek(offset, whence)

    def flush(self) -> None:
        self._wait()
        self._f.flush()

    def fileno(self) -> int:
        """The wrapped file's descriptor, once no write is in flight (for reading back written bytes)."""
        self._wait()
        return self._f.fileno()

    def abort(self) -> None:
        """Wait until no write is in flight, whatever happens meanwhile; drop any write error.

        For cleanup paths: even a KeyboardInterrupt during the wait does not leave the thread
        writing into a file that the caller is about to close (the interrupt is re-raised after).
        """
        interrupted: BaseException | None = None
        while self._thread is not None and self._thread.is_alive():
            try:
                self._thread.join()
            except BaseException as e:  # noqa: BLE001 - remembered and re-raised below
                interrupted = e
        self._thread, self._error = None, None
        if not self.closed:
            super().close()
        if interrupted is not None:
            raise interrupted

    def close(self) -> None:
        if not self.closed:
            try:
                self._wait()
            finally:
                super().close()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False


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
