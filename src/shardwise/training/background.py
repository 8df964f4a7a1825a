"""The writer thread of async saves: one save in flight per process, errors kept until someone asks.

:func:`submit` starts a save's remaining work (writing, manifest, ``done``, rename, retention) on a
thread and returns; :func:`wait` blocks until it ends and raises its error, once. The next save,
a load, :func:`shardwise.finalize_checkpoint` and interpreter exit all wait; at exit an error can
no longer be raised, so it is printed to stderr.
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import Callable

__all__ = ["submit", "wait"]

_thread: threading.Thread | None = None
_error: BaseException | None = None
_atexit_registered = False


def submit(work: Callable[[], None]) -> None:
    """Run ``work`` on the writer thread; the previous save must have been waited for."""
    global _thread, _atexit_registered
    if _thread is not None:
        raise RuntimeError("an async save is still pending; wait() for it first")

    def run() -> None:
        global _error
        try:
            work()
        except BaseException as e:  # kept for the next call; a thread has no one else to tell
            _error = e

    if not _atexit_registered:
        atexit.register(_wait_at_exit)
        _atexit_registered = True
    thread = threading.Thread(target=run, name="shardwise-async-save", daemon=True)
    thread.start()
    _thread = thread  # only a started thread is waited for


def wait() -> None:
    """Block until the pending save (if any) is complete; raise its error, if it failed."""
    global _thread, _error
    if _thread is not None:
        _thread.join()
        _thread = None
    if _error is not None:
        error, _error = _error, None
        raise error


def _wait_at_exit() -> None:
    try:
        wait()
    except BaseException as e:
        print(f"shardwise: error: the last async checkpoint save failed: {e}", file=sys.stderr)
