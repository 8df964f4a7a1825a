"""Remote inputs and outputs as local paths for the length of one call.

- :func:`fetch` copies a remote file, or every object under a remote folder, into a fresh local
  scratch folder (``TMPDIR``) under the same base name, so that format detection and suffix rules
  see what they would see locally. The caller removes the scratch folder (:class:`Scratch`).
- :func:`published` yields a local path that does not exist yet; when the block succeeds, what was
  written there is uploaded to the URL and the scratch copy removed. A file becomes one object
  (whole or absent, see :mod:`.transfer`). A folder's objects go up in an order that makes the
  output complete or absent to every reader: the data first, then the files that make a folder a
  model (``config.json``, weight indexes), then the manifest ``shardwise.json``, then ``done``.
  A folder replaced with ``overwrite`` is deleted first (its completing files before the rest),
  so an interrupted replacement leaves part of the new output without its completing files,
  never a mix of old and new. A folder is not replaced by a file nor a file by a folder. On
  failure nothing is uploaded. Object stores cannot rename, so unlike a local output, the old
  output is gone once its replacement starts uploading.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..atomic import remove_stale_stages
from ..errors import FormatError, OutputExistsError
from .transfer import download_all, listing, remove_in_order, remove_objects, upload_all
from .urls import Remote

__all__ = ["Scratch", "fetch", "fetch_safetensors_header", "published", "publish_order"]

# Objects uploaded after all others, in this order: the files that make a folder a model to its
# readers (HF configs and indexes, NeMo's config, DCP and torch_dist metadata), then the manifest.
_COMPLETES = (
    "config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "model_config.yaml",
    "common.pt", "metadata.json", ".metadata", "shardwise.json", "done",
)
_SCRATCH = re.compile(r"shardwise-(?:fetch|publish|save|load)-(?P<pid>\d+)-.+")


class Scratch:
    """A local scratch folder under ``TMPDIR`` removed by :meth:`remove` (idempotent).

    Its name carries the process id: creating one first removes the scratch folders of processes
    that no longer exist (killed mid-save, say), as local saves clear their dead staging folders.
    """

    def __init__(self, prefix: str):
        root = Path(tempfile.gettempdir())
        with contextlib.suppress(OSError):  # an unreadable TMPDIR: nothing to sweep
            remove_stale_stages(root, _SCRATCH, folders_only=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"shardwise-{prefix}-{os.getpid()}-", dir=root))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _basename(remote: Remote) -> str:
    return PurePosixPath(remote.path.rstrip("/")).name or "root"


def fetch(url: str, *, headers_only: bool = False) -> tuple[Path, Scratch]:
    """Download ``url`` (a file or a folder) into a new scratch folder; (its local path, the scratch).

    ``headers_only`` (for readers of headers, such as ``inspect``): a ``.safetensors`` file is
    fetched as its header alone, in a sparse local file of the full size whose data section reads
    as zeros; everything else is fetched whole. FormatError naming the URL when nothing is there;
    an error while fetching removes the scratch.
    """
    remote = Remote(url)
    kind, files = listing(remote)
    scratch = Scratch("fetch")
    local = scratch.path / _basename(remote)
    base = remote.path.rstrip("/")
    pairs = [(remote.path, local, files[""])] if kind == "file" else [(f"{base}/{rel}", local / rel, files[rel]) for rel in sorted(files)]
    try:
        if kind == "folder":
            local.mkdir()
        whole = []
        for rpath, path, info in pairs:
            if headers_only and rpath.endswith(".safetensors"):
                fetch_safetensors_header(remote.fs, rpath, path, int(info["size"]))
            else:
                whole.append((rpath, path))
        download_all(whole, remote.fs)
    except BaseException:
        scratch.remove()
        raise
    return local, scratch


def fetch_safetensors_header(fs, rpath: str, local: Path, size: int) -> None:
    """Write ``local`` as a sparse copy of the remote safetensors file: its length prefix and JSON
    header fetched by two ranged reads, the rest a hole of the right size (never read by header readers)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    head = fs.cat_file(rpath, start=0, end=min(8, size))
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    header = fs.cat_file(rpath, start=8, end=min(size, 8 + n)) if 0 < n <= size - 8 else b""
    with open(local, "wb") as f:
        f.write(head + header)
        f.truncate(size)  # a malformed length is left for the reader to report, from the bytes it sees


def publish_order(names: list[str]) -> list[list[str]]:
    """Upload batches for a folder's relative file names: the data, then each completing file (see module docstring)."""
    last = [n for n in _COMPLETES if n in names]
    return [[n for n in sorted(names) if n not in _COMPLETES], *[[n] for n in last]]


@contextlib.contextmanager
def published(url: str, *, overwrite: bool, any_kind: bool = False) -> Iterator[Path]:
    """Yield a local path to write the output for ``url`` into; upload it on success (see module docstring).

    An existing output raises OutputExistsError before anything runs unless ``overwrite``; even
    then a folder is not replaced by a file nor a file by a folder (as locally), unless ``any_kind``.
    """
    remote = Remote(url)
    existing = _existing(remote)
    if existing is not None and not overwrite:
        raise OutputExistsError(f"{url}: output already exists; pass --overwrite (overwrite=True) to replace it")
    scratch = Scratch("publish")
    local = scratch.path / _basename(remote)
    try:
        yield local
        if not local.exists():
            raise FormatError(f"{url}: nothing was written to publish")
        if existing is not None and not any_kind and (existing[0] == "file") != local.is_file():
            have, want = ("a file", "folder") if existing[0] == "file" else ("a folder", "file")
            raise OutputExistsError(f"{url}: exists and is {have}; --overwrite only replaces it with a {want} of the same kind")
        _publish(local, remote, existing)
    finally:
        scratch.remove()


def _existing(remote: Remote) -> tuple[str, dict[str, dict]] | None:
    """What :func:`.transfer.listing` says is at ``remote`` (kind, files); None when nothing is there."""
    try:
        return listing(remote)
    except FormatError:  # nothing there
        return None


def _publish(local: Path, remote: Remote, existing: tuple[str, dict[str, dict]] | None) -> None:
    fs, base = remote.fs, remote.path.rstrip("/")
    kind, files = existing or (None, {})
    old_folder = set(files) if kind == "folder" else set()
    if local.is_file():
        remove_objects(fs, [f"{base}/{rel}" for rel in sorted(old_folder)])  # a folder replaced by a file
        upload_all([(local, base)], fs)
        return
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if kind == "file":  # a file replaced by a folder
        remove_objects(fs, [base])
    # The old folder goes first, its completing files before the rest: an interrupted overwrite
    # must never leave old and new data side by side under files that make them read as one model.
    remove_in_order(fs, base, old_folder, _COMPLETES)
    for batch in publish_order(names):
        upload_all([(local / n, f"{base}/{n}") for n in batch], fs)
