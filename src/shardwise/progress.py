"""Progress reporting for long operations: a rich bar on a terminal, silence elsewhere.

The library reports through the small :class:`Progress` protocol and defaults to
:data:`NO_PROGRESS`; the command line passes :func:`terminal_progress`, which shows bytes done of
total, throughput and time left on stderr only when stderr is a terminal and ``--quiet`` is off.
"""

from __future__ import annotations

import sys
import threading
from typing import Protocol, TextIO

__all__ = ["Progress", "NO_PROGRESS", "terminal_progress", "SerialProgress"]


class Progress(Protocol):
    """``start`` and ``finish`` are called on the caller's thread. ``advance`` may be called from
    shardwise's own threads (files written two at a time), never two calls at once."""

    def start(self, total_bytes: int, description: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class _Silent:
    def start(self, total_bytes: int, description: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


NO_PROGRESS: Progress = _Silent()


class SerialProgress:
    """``progress`` with ``advance`` calls from several threads serialised (one at a time)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._lock = threading.Lock()

    def start(self, total_bytes: int, description: str) -> None:
        self._progress.start(total_bytes, description)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._progress.advance(nbytes)

    def finish(self) -> None:
        self._progress.finish()


class _RichBar:
    """A byte-counting rich progress bar on the given stream."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console

        self._console = Console(file=stream)
        self._bar = None
        self._task = None

    def start(self, total_bytes: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress as RichProgress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def terminal_progress(*, quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """A progress bar on ``stream`` (default stderr) if it is a terminal and not ``quiet``; else silence."""
    stream = stream if stream is not None else sys.stderr
    if quiet or not (hasattr(stream, "isatty") and stream.isatty()):
        return NO_PROGRESS
    return _RichBar(stream)
