"""The Lightning plugins on object storage: checkpoint paths that are ``s3://`` (any fsspec) URLs.

The same rules as for local paths (:mod:`.paths`), through :mod:`shardwise.storage`:

- save: the folder is written into local scratch, then published (streamed multipart uploads, its
  ``shardwise.json`` last, see :func:`shardwise.storage.mirror.published`). What may be replaced
  is what may be replaced locally: nothing, a single object (a ``.ckpt``), a Lightning checkpoint
  folder shardwise wrote (or the payload a save cut off before its manifest left), or a DCP
  folder; any other folder is an OutputExistsError;
- load: the checkpoint is fetched to scratch and loaded as a local one; errors name the URL;
- remove: the objects of a checkpoint (``shardwise.json`` first, so the folder never reads as a
  whole checkpoint once removal began), or the single object; a missing URL is fine.
"""

from __future__ import annotations

from typing import Any

from ..errors import FormatError, OutputExistsError, ShardwiseError
from ..formats.dcp import METADATA as DCP_METADATA
from ..storage.entry import renamed_error
from ..storage.mirror import fetch, published
from ..storage.transfer import listing, read_json_object, remove_in_order, remove_objects
from ..storage.urls import Remote
from .folder import FORMAT, PAYLOAD, PICKLED, write_folder
from ..training.layout import MANIFEST
from .paths import NOT_A_CHECKPOINT, load

__all__ = ["check_replaceable_url", "save_url", "load_url", "remove_url"]

_MISSING, _OBJECT, _CHECKPOINT, _OTHER = "missing", "object", "checkpoint", "other"


def _kind(remote: Remote) -> tuple[str, dict]:
    try:
        kind, files = listing(remote)
    except FormatError:
        return _MISSING, {}
    if kind == "file":
        return _OBJECT, files
    if DCP_METADATA in files:
        return _CHECKPOINT, files
    if MANIFEST not in files and set(files) <= {PAYLOAD, PICKLED}:
        return _CHECKPOINT, files  # what a save cut off before its manifest left: replaceable, removable
    if MANIFEST in files:
        document = read_json_object(remote.fs, f"{remote.path}/{MANIFEST}")
        if document is not None and document.get("format") == FORMAT:
            return _CHECKPOINT, files
    return _OTHER, files


def check_replaceable_url(url: str) -> None:
    """OutputExistsError unless a save may replace what is at ``url`` (see module docstring)."""
    if _kind(Remote(url))[0] == _OTHER:
        raise OutputExistsError(f"{url}: {NOT_A_CHECKPOINT}; not replaced by a checkpoint")


def save_url(snapshot: Any, url: str) -> None:
    """Write a snapshot (:func:`.folder.snapshot_checkpoint`) as a checkpoint folder at ``url``; the caller
    has checked that it may replace what is there (:func:`check_replaceable_url`), as for local folders."""
    with published(url, overwrite=True, any_kind=True) as local:  # a single-file .ckpt becomes a folder
        write_folder(snapshot, local)


def load_url(url: str, *, trust_pickle: bool, verify: bool) -> dict:
    """The checkpoint dict at ``url`` (see :func:`.paths.load`)."""
    local, scratch = fetch(url)
    try:
        return load(local, trust_pickle=trust_pickle, verify=verify)
    except (ShardwiseError, OSError) as e:
        raise renamed_error(e, {str(local): url}) from None
    finally:
        scratch.remove()


def remove_url(url: str) -> None:
    """Remove the checkpoint at ``url``; nothing there is fine; FormatError, nothing removed, for another folder."""
    remote = Remote(url)
    kind, files = _kind(remote)
    if kind == _MISSING:
        return
    if kind == _OBJECT:
        remove_objects(remote.fs, [remote.path])
        return
    if kind == _OTHER:
        raise FormatError(f"{url}: not removed: {NOT_A_CHECKPOINT}")
    remove_in_order(remote.fs, remote.path, files, (MANIFEST, DCP_METADATA))
