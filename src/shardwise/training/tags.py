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
from .encodings import ENCODINGS
from .layout import DONE, MANIFEST, MARKER, manifest_entries, manifest_problem

__all__ = ["Tag", "make_tag", "list_tags", "tags_to_remove", "next_sequence", "default_tag", "UNREADABLE"]

UNREADABLE = object()  # what a tag's manifest reader passes to make_tag for a file that is not a JSON object


@dataclass(frozen=True)
class Tag:
    """One checkpoint directory: ``complete`` when its ``done`` marker exists and every file the
    manifest lists has the listed size (checksums are checked on load, not here). ``damage`` says
    why its manifest is unusable (a damaged tag is incomplete, its ``manifest`` None)."""

    name: str
    path: Path
    done: bool
    complete: bool
    sequence: int | None
    manifest: dict | None
    order_key: tuple
    listing: dict | None = None  # remote tags: every file's size by relative name (one listing serves all checks)
    damage: str | None = None

    @functools.cached_property
    def entries(self) -> dict[str, dict]:
        """The manifest's files by name (empty without a manifest)."""
        return manifest_entries(self.manifest)


def _manifest(path: Path):
    """The parsed manifest of the tag at ``path``: None without one, UNREADABLE when it is not a JSON object."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return read_json_object(file, "manifest")
    except FormatError:
        return UNREADABLE


def _sizes_match(manifest: dict, size_of) -> bool:
    return all(size_of(entry["name"]) == entry["size"] for entry in manifest["files"])


def make_tag(name: str, path, manifest, done: bool, size_of, mtime: float, listing: dict | None = None) -> Tag:
    """A Tag from what was found: its parsed manifest (None when there is none, UNREADABLE when it is
    not a JSON object; any other shape is checked here), whether ``done`` exists, ``size_of(relative name)``
    (None when missing) and the mtime of ``done`` (else the marker). A damaged manifest makes the
    tag incomplete, ordered by time after every tag with a sequence (``damage`` says why), never an error."""
    damage = None
    if manifest is not None:
        damage = "it is not a JSON object" if manifest is UNREADABLE else manifest_problem(manifest, ENCODINGS)
        if damage is not None:
            manifest = None
    complete = done and damage is None and (manifest is None or _sizes_match(manifest, size_of))
    sequence = manifest.get("sequence") if manifest is not None else None
    order_key = (0, sequence, mtime) if sequence is not None else (1, 0, mtime)
    return Tag(name, path, done, complete, sequence, manifest, order_key, listing, damage)


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


def default_tag(sequence: int) -> str:
    """The name of a tag saved without one."""
    return f"checkpoint_{sequence}"


def next_sequence(tags: list[Tag]) -> int:
    """The sequence of the next save: after every tag's, and one whose :func:`default_tag` no tag
    has (a damaged manifest hides its tag's sequence; its folder must not be saved over)."""
    sequence = 1 + max((t.sequence for t in tags if t.sequence is not None), default=0)
    names = {t.name for t in tags}
    while default_tag(sequence) in names:
        sequence += 1
    return sequence


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
