"""Training checkpoints on object storage (``save_checkpoint("s3://bucket/run", ...)``): NxD's
layout, written without renames.

Object stores cannot rename a folder into place, so a tag is made complete-or-absent by order:

1. ``begin`` (leader): saving over a complete tag is refused (a failed save would lose it: there
   is no rename to replace it atomically); an incomplete tag of that name is removed (its
   ``done`` before anything else, see :func:`remove_tag`), then the ``checkpoint`` marker and a manifest that lists no
   files yet but gives the tag its place in the save order (see :func:`begin_tag`);
2. every rank writes its files into its own local scratch folder exactly as a local save does,
   uploads each (streamed, multipart, see :mod:`shardwise.storage.transfer`) and removes the scratch.
   DP ranks never share a file here: an object cannot be written by several processes at once;
3. ``commit`` (leader, once every rank succeeded): the full manifest, then ``done``. A tag counts as
   complete only when ``done`` is there and every file its manifest lists has the listed size,
   so an upload cut short at any moment (a killed process, a lost link) leaves an incomplete tag
   that loading passes over and retention removes, and the earlier tags as they were. A failed
   save deletes what it uploaded.

Loading picks the tag from one listing (paged, however many objects) and each rank downloads
only the files it reads (:func:`files_for_rank`) into a scratch folder that is removed afterwards.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..distributed import ParallelCoords
from ..errors import FormatError, OutputExistsError
from ..jsonfile import document_bytes
from ..storage.transfer import download_all, listing, read_json_object, remove_in_order, upload_all
from ..storage.urls import Remote, join
from .encodings import state_name
from .layout import DONE, MANIFEST, MARKER, parse_rank_file
from .tags import UNREADABLE, Tag, make_tag

__all__ = ["RemoteRoot", "list_remote_tags", "remove_tag", "begin_tag", "upload_files", "commit_tag", "discard_tag", "fetch_for_rank", "files_for_rank"]


@dataclass(frozen=True)
class RemoteRoot:
    """A checkpoint folder on a remote filesystem, by URL (picklable: it crosses the process group)."""

    url: str

    def remote(self, *names: str) -> Remote:
        return Remote(join(self.url, *names) if names else self.url)


def _mtime(info: dict) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
    if hasattr(stamp, "timestamp"):
        return stamp.timestamp()
    return float(stamp) if isinstance(stamp, (int, float)) else 0.0


def _read_manifest(remote: Remote):
    """The parsed manifest object at ``remote`` (its shape is checked by :func:`.tags.make_tag`), or UNREADABLE."""
    try:
        document = read_json_object(remote.fs, remote.path)
    except RecursionError:
        return UNREADABLE
    return UNREADABLE if document is None else document


def list_remote_tags(root: RemoteRoot) -> list[Tag]:
    """Every tag under ``root`` (one with a marker or a manifest), oldest first, from one listing.

    Each Tag's ``path`` is its URL and ``listing`` its files' sizes; complete as for local tags.
    """
    try:
        kind, files = listing(root.remote())
    except FormatError:
        return []
    if kind == "file":
        raise FormatError(f"{root.url}: is a file, not a checkpoint folder")
    by_tag: dict[str, dict[str, dict]] = {}
    for rel, info in files.items():
        head, _, rest = rel.partition("/")
        if rest and not head.startswith("."):
            by_tag.setdefault(head, {})[rest] = info
    tags = []
    for name, contents in by_tag.items():
        if MARKER not in contents and MANIFEST not in contents:
            continue
        manifest = _read_manifest(root.remote(name, MANIFEST)) if MANIFEST in contents else None
        stamp = contents.get(DONE) or contents.get(MARKER) or {}
        sizes = {rel: int(info.get("size", -1)) for rel, info in contents.items()}
        tags.append(make_tag(name, root.remote(name).url, manifest, DONE in contents, sizes.get, _mtime(stamp), listing=sizes))
    return sorted(tags, key=lambda t: t.order_key)


def remove_tag(tag: Tag) -> None:
    """Remove a remote tag: ``done`` first, so an interruption leaves it incomplete, never half-valid."""
    _remove_listed(Remote(str(tag.path)), tag.listing or {})


def _remove_listed(remote: Remote, names: Iterable[str]) -> None:
    """Remove these objects of the tag at ``remote``, ``done`` first (whether listed or not)."""
    remove_in_order(remote.fs, remote.path, {*names, DONE}, [DONE])


def begin_tag(root: RemoteRoot, name: str, existing: list[Tag], announcement: dict) -> None:
    """Step 1 for a remote tag: remove an earlier tag of the same name, upload the marker and a
    manifest listing no files yet (``announcement``).

    That first manifest gives the tag its save sequence from the start: a save killed mid-upload
    is then ordered among the others, so retention removes it once newer tags are kept, where a
    local save would leave only a hidden staging folder behind. Without ``done`` it is incomplete.
    """
    for tag in existing:
        if tag.name == name:
            if tag.complete:
                raise OutputExistsError(
                    f"{root.url}/{name}: a complete checkpoint of this name exists; object storage cannot replace it atomically "
                    f"(it would be gone if this save failed): save under a new tag, or remove it first"
                )
            remove_tag(tag)  # an incomplete one: what a killed save left
    marker, manifest = root.remote(name, MARKER), root.remote(name, MANIFEST)
    marker.fs.pipe_file(marker.path, b"1")
    manifest.fs.pipe_file(manifest.path, document_bytes(announcement))


def upload_files(root: RemoteRoot, tag: str, stage: Path, names: Iterable[str]) -> None:
    """Step 2 for one rank: upload these files of its local ``stage`` under the tag."""
    target = root.remote(tag)
    upload_all([(stage / n, f"{target.path}/{n}") for n in sorted(set(names))], target.fs)


def commit_tag(root: RemoteRoot, tag: str, document: dict) -> None:
    """Step 3: the manifest, then ``done`` (the tag is complete from that moment)."""
    manifest, done = root.remote(tag, MANIFEST), root.remote(tag, DONE)
    manifest.fs.pipe_file(manifest.path, document_bytes(document))
    done.fs.pipe_file(done.path, b"1")


def discard_tag(root: RemoteRoot, tag: str) -> None:
    """Delete what a failed save uploaded under ``tag`` (a warning if that fails too: the tag stays incomplete)."""
    try:
        remote = root.remote(tag)
        try:
            kind, files = listing(remote)  # that tag's objects alone
        except FormatError:
            return  # nothing there
        if kind == "folder" and files:  # an object named as the tag is no tag
            _remove_listed(remote, files)
    except OSError as e:
        warnings.warn(f"{root.url}/{tag}: the failed save's files could not be removed ({e}); the tag stays incomplete", stacklevel=3)


def files_for_rank(names: Iterable[str], layout: dict, coords: ParallelCoords, *, model: bool, optimizer: bool, same_grid: bool) -> list[str]:
    """Which of a tag's files (relative names) this rank reads on load.

    Top-level files always (manifest, scheduler, user content, markers); model files of its
    (tp, pp), or all model files when the weights are resharded (``same_grid`` false); optimizer
    files of its (tp, pp): only its own DP rank's when a ZeRO-1 state is loaded at the saved DP
    size, else every DP rank's (merged and re-split). xser files bring their ``.tensors/`` folders.
    """
    chosen = []
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) == 1:
            chosen.append(name)
            continue
        folder, file = parts[0], parts[1]
        rank = parse_rank_file(state_name(file))
        if rank is None:
            continue
        mine = (rank.tp, rank.pp) == (coords.tp_rank, coords.pp_rank)
        if folder == "model" and model and (mine or not same_grid):
            chosen.append(name)
        elif folder == "optim" and optimizer and mine:
            own_dp_only = layout.get("optimizer") == "zero1" and layout.get("dp") == coords.dp_size
            if not own_dp_only or rank.dp == coords.dp_rank:
                chosen.append(name)
    return chosen


def fetch_for_rank(tag: Tag, wanted: list[str], local: Path) -> Tag:
    """Download ``wanted`` files of the remote ``tag`` into the new folder ``local``; the tag seen there."""
    remote = Remote(str(tag.path))
    local.mkdir()
    download_all([(f"{remote.path}/{n}", local / n) for n in wanted], remote.fs)
    return replace(tag, path=local)
