"""Moving files between local disk and a remote filesystem, streamed in parts.

- :func:`upload` writes a local file to a remote path through the filesystem's buffered writer in
  parts of ``part_size`` bytes: on S3 a multipart upload once the file outgrows one part, with at
  most about two parts in memory whatever the file's size. If anything fails (a read error, a
  refused part, KeyboardInterrupt) the upload is abandoned: S3 aborts the multipart upload, and
  no object appears under the name. An object is therefore whole or absent, never truncated.
- :func:`download_all` fetches remote files to local paths, several at a time, each in ranged
  reads of ``READ_SIZE`` bytes (so a download holds one part per file in memory, not the file).
- :func:`listing` lists a remote file or folder with sizes: every object under a prefix, however
  many (the filesystem pages through listings of more than 1000 keys).
- :func:`remove_in_order` deletes a folder's objects, some named ones before the rest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from ..errors import FormatError
from ..jsonfile import parse_json_object
from .urls import Remote

__all__ = ["PART_SIZE", "READ_SIZE", "upload", "upload_all", "download", "download_all", "listing", "read_json_object", "remove_objects", "remove_in_order"]

PART_SIZE = 16 * 2**20  # S3 needs at least 5 MiB per part (but the last); 16 MiB parts allow files up to 156 GiB
READ_SIZE = 64 * 2**20  # one ranged GET per 64 MiB: few requests, a bounded buffer (times the few files at once)
_WORKERS = 4  # object stores are latency-bound: a few transfers at once fill the link


def upload(local: Path, fs, rpath: str, part_size: int = PART_SIZE) -> None:
    """Copy the file ``local`` to ``rpath`` on ``fs``, ``part_size`` bytes at a time (see module docstring)."""
    with open(local, "rb") as src:
        dst = fs.open(rpath, "wb", block_size=part_size)
        try:
            while True:
                data = src.read(part_size)
                if not data:
                    break
                dst.write(data)
            dst.close()  # the last part and the completion: a failure here must abort the upload too
        except BaseException:
            _abandon(dst)
            raise


def _abandon(f) -> None:
    """Give up a file being written: S3 aborts its multipart upload; nothing is committed.

    Errors while aborting are dropped: the error that made the upload fail is the one to report.
    """
    try:
        f.discard()  # s3fs: abort the multipart upload and drop the buffer
    except Exception:  # noqa: BLE001
        pass
    finally:
        f.closed = True  # close() would commit what was buffered


def upload_all(pairs: Iterable[tuple[Path, str]], fs, part_size: int = PART_SIZE) -> None:
    """Upload each (local file, remote path), a few at a time; the first failure is raised after the others stop."""
    _in_pool("shardwise-upload", [(upload, (local, fs, rpath, part_size)) for local, rpath in pairs])


def download(fs, rpath: str, local: Path, part_size: int = READ_SIZE) -> None:
    """Copy the remote file ``rpath`` to ``local`` in ranged reads of ``part_size`` bytes (one part in memory at a time)."""
    with fs.open(rpath, "rb", block_size=part_size, cache_type="none") as src, open(local, "wb") as dst:
        while True:
            data = src.read(part_size)
            if not data:
                break
            dst.write(data)


def download_all(pairs: Iterable[tuple[str, Path]], fs, part_size: int = READ_SIZE) -> None:
    """Fetch each (remote path, local file), creating the local folders; streamed, a few files at a time."""
    pairs = list(pairs)
    for _, local in pairs:
        local.parent.mkdir(parents=True, exist_ok=True)
    _in_pool("shardwise-download", [(download, (fs, rpath, local, part_size)) for rpath, local in pairs])


def _in_pool(name: str, calls: list) -> None:
    """Run ``calls`` ((function, args) pairs) a few at a time; at the first failure the queued ones are
    cancelled, the running ones finish, and the failure is raised. One call runs on this thread."""
    if len(calls) < 2:
        for fn, args in calls:
            fn(*args)
        return
    pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix=name)
    try:
        for future in [pool.submit(fn, *args) for fn, args in calls]:
            future.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def listing(remote: Remote) -> tuple[str, dict[str, dict]]:
    """``("file", {"": info})`` for an object, ``("folder", {relpath: info, ...})`` for a prefix.

    ``info`` is the filesystem's description (``size`` and, on S3, ``LastModified``). FormatError
    naming the URL when nothing is there.
    """
    fs = remote.fs
    fs.invalidate_cache()  # other processes write here too: never answer from a stale listing
    try:
        info = fs.info(remote.path)
        if info.get("type") != "directory":
            return "file", {"": info}
        found = fs.find(remote.path, detail=True)
    except FileNotFoundError:
        raise FormatError(f"{remote.url}: no such file or folder") from None
    except OSError:
        raise
    except Exception as e:  # the client's own errors (no credentials, endpoint unreachable): one line naming the URL
        raise OSError(f"{remote.url}: {type(e).__name__}: {e}") from e
    base = remote.path.rstrip("/") + "/"
    files = {
        name[len(base):]: entry for name, entry in found.items()
        if name.startswith(base) and entry.get("type") != "directory" and not name.endswith("/")  # "dir/" marker keys
    }
    return "folder", files


def read_json_object(fs, rpath: str) -> dict | None:
    """The JSON object stored at ``rpath`` on ``fs``; None when it is not UTF-8 JSON or not an object."""
    try:
        return parse_json_object(fs.cat_file(rpath), rpath, "document")
    except FormatError:
        return None


def remove_objects(fs, rpaths: Iterable[str]) -> None:
    """Delete these objects (missing ones are not an error)."""
    rpaths = list(rpaths)
    if rpaths:
        try:
            fs.rm(rpaths)
        except FileNotFoundError:
            pass


def remove_in_order(fs, base: str, names: Iterable[str], first: Iterable[str]) -> None:
    """Delete the objects ``base/name`` for ``names``: those also in ``first`` before the rest (so an
    interruption never leaves the rest without the files that make the folder read as complete)."""
    names = set(names)
    head = [n for n in first if n in names]
    remove_objects(fs, [f"{base}/{n}" for n in head])
    remove_objects(fs, [f"{base}/{n}" for n in sorted(names - set(head))])
