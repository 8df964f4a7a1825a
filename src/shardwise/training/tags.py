"""The tags of a checkpoint folder: which are complete, in which order they were saved, which to remove.

Save order comes from the ``sequence`` each manifest records (1, 2, 3, ... per folder), never from
file times, which a copy or a clock step reorders. Tags written by NxD have no manifest; they
are ordered by their ``done`` (or ``checkpoint``) file's mtime, after all tags that have a
sequence are ordered among themselves, as NxD orders them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..jsonfile import read_json_object
from .layout import DONE, MANIFEST, MANIFEST_FORMAT, MARKER, manifest_entries

__all__ = ["Tag", "make_tag", "list_tags", "tags_to_remove", "next_sequence"]


@dataclass(frozen=True)
class Tag:
    """One checkpoint directory: ``complete`` when its ``done`` marker exists and every file the
    manifest lists has the listed size (checksums are checked on load, not here)."""

    name: str
    path: Path
    done: bool
    complete: bool
    sequence: int | None
    manifest: dict | None
    order_key: tuple
    listing: dict | None = None  # remote tags: every file's size by relative name (one listing serves all checks)

    @functools.cached_property
    def entries(self) -> dict[str, dict]:
        """The manifest's files by name (empty without a manifest)."""
        return manifest_entries(self.manifest)


def _manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        document = read_json_object(file, "manifest")
    except FormatError:
        return {"broken": True}
    return document if document.get("format") == MANIFEST_FORMAT else {"broken": True}


def _sizes_match(manifest: dict, size_of) -> bool:
    return all(size_of(entry["name"]) == entry["size"] for entry in manifest.get("files", []))


def make_tag(name: str, path, manifest: dict | None, done: bool, size_of, mtime: float, listing: dict | None = None) -> Tag:
    """A Tag from what was found: its manifest (``{"broken": True}`` when unreadable), whether ``done``
    exists, ``size_of(relative name)`` (None when missing) and the mtime of ``done`` (else the marker)."""
    broken = manifest is not None and manifest.get("broken")
    complete = done and not broken and (manifest is None or _sizes_match(manifest, size_of))
    sequence = manifest.get("sequence") if manifest and not broken and isinstance(manifest.get("sequence"), int) else None
    order_key = (0, sequence, mtime) if sequence is not None else (1, 0, mtime)
    return Tag(name, path, done, complete, sequence, None if broken else manifest, order_key, listing)


def _read_tag(path: Path) -> Tag:
    def size_of(rel: str) -> int | None:
        file = path / rel
        return file.stat().st_size if file.is_file() else None

    done = (path / DONE).is_file()
    stamp = (path / DONE) if done else (path / MARKER)
    mtime = stamp.stat().st_mtime if stamp.exists() else 0.0
    return make_tag(path.name, path, _manifest(path), done, size_of, mtime)


def list_tags(root: Path) -> list[Tag]:
    """Every checkpoint directory (one with a ``checkpoint`` marker or a manifest) under ``root``, oldest first."""
    if not root.is_dir():
        if root.exists():
            raise FormatError(f"{root}: is a file, not a checkpoint folder")
        return []
    tags = [
        _read_tag(child) for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".")  # hidden: staging folders of saves in progress
        and ((child / MARKER).is_file() or (child / MANIFEST).is_file())
    ]
    return sorted(tags, key=lambda t: t.order_key)


def next_sequence(tags: list[Tag]) -> int:
    return 1 + max((t.sequence for t in tags if t.sequence is not None), default=0)


def tags_to_remove(tags: list[Tag], keep: int | None, current: str) -> list[Tag]:
    """What retention removes after ``current`` was saved, given ``tags`` oldest first (``keep`` >= 1, or None/-1).

    - complete tags beyond the ``keep`` newest (``None`` or -1 keeps all);
    - incomplete tags older than the oldest complete tag that is kept: interrupted removals or
      saves that later saves have superseded;
    never ``current``, and never an incomplete tag newer than the oldest kept one (a save that
    may still be in progress or that a resumed run will redo).
    """
    if keep is None or keep < 0:
        return []
    complete = [t for t in tags if t.complete]
    kept = complete[-keep:]
    oldest_kept = tags.index(kept[0]) if kept else len(tags)
    remove = [t for t in complete[:-keep]] + [t for t in tags[:oldest_kept] if not t.complete]
    return sorted((t for t in remove if t.name != current), key=lambda t: t.order_key)
