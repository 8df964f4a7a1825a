"""Where a training checkpoint keeps what: NxD's layout of one tag, plus shardwise's manifest.

    <root>/<tag>/checkpoint                              marker, written first ("1")
    <root>/<tag>/model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt
    <root>/<tag>/optim/dp_rank_DD_tp_rank_TT_pp_rank_PP.pt   (one per DP rank with ZeRO-1)
    <root>/<tag>/optim/full_tp_rank_TT_pp_rank_PP.pt         (ZeRO-1 merged by ``zero-convert --to-full``)
    <root>/<tag>/scheduler.pt
    <root>/<tag>/user_content.pt
    <root>/<tag>/shardwise.json                          manifest: order, layout, sizes, CRC-32s
    <root>/<tag>/done                                    written last ("1")

Names follow NxD's ``_get_path`` (dp, then ep when expert parallelism is on, then tp, then pp, two
digits), so NxD loads our checkpoints and we load NxD's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError

__all__ = [
    "MARKER", "DONE", "MANIFEST", "SCHEDULER", "USER_CONTENT", "MANIFEST_FORMAT", "MANIFEST_VERSION",
    "OPTIMIZER_KINDS", "RankFile", "rank_file_name", "manifest_entries", "model_file", "optim_file", "full_optim_file", "parse_rank_file", "manifest_document",
    "checked_file_entries", "manifest_problem", "is_inside", "file_entry_ok",
]

MARKER = "checkpoint"
DONE = "done"
MANIFEST = "shardwise.json"
SCHEDULER = "scheduler.pt"
USER_CONTENT = "user_content.pt"
MANIFEST_FORMAT = "shardwise-training-checkpoint"
MANIFEST_VERSION = 1
OPTIMIZER_KINDS = ("replicated", "zero1", "zero1-full")  # the manifest's layout["optimizer"]

_RANK_FILE = re.compile(r"(?:dp_rank_(?P<dp>\d+)|(?P<full>full))(?:_ep_rank_(?P<ep>\d+))?_tp_rank_(?P<tp>\d+)_pp_rank_(?P<pp>\d+)\.pt")


@dataclass(frozen=True)
class RankFile:
    """The coordinates in a model or optimizer file name; ``dp`` is None for a merged (``full_``) file."""

    dp: int | None
    tp: int
    pp: int
    ep: int | None = None


def rank_file_name(dp: int | None, tp: int, pp: int, ep: int | None = None) -> str:
    """``dp_rank_DD[_ep_rank_EE]_tp_rank_TT_pp_rank_PP.pt`` as NxD's ``_get_path`` names it (``full_...`` for dp None)."""
    head = "full" if dp is None else f"dp_rank_{dp:02d}"
    ep_part = "" if ep is None else f"_ep_rank_{ep:02d}"
    return f"{head}{ep_part}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


def model_file(tp_rank: int = 0, pp_rank: int = 0, ep_rank: int | None = None) -> str:
    """A model shard's path inside the tag; always named for DP rank 0, as NxD names it."""
    return f"model/{rank_file_name(0, tp_rank, pp_rank, ep_rank)}"


def optim_file(dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0, ep_rank: int | None = None) -> str:
    """An optimizer shard's path inside the tag (``dp_rank`` > 0 only with ZeRO-1)."""
    return f"optim/{rank_file_name(dp_rank, tp_rank, pp_rank, ep_rank)}"


def full_optim_file(tp_rank: int = 0, pp_rank: int = 0, ep_rank: int | None = None) -> str:
    """A ZeRO-1 optimizer state merged over DP, as NxD's ``nxd_convert_zero_checkpoints --convert_to_full`` names it."""
    return f"optim/{rank_file_name(None, tp_rank, pp_rank, ep_rank)}"


def parse_rank_file(file_name: str) -> RankFile | None:
    """The coordinates of ``dp_rank_DD[_ep_rank_EE]_tp_rank_TT_pp_rank_PP.pt`` or ``full_...``; None for other names."""
    m = _RANK_FILE.fullmatch(file_name)
    if m is None:
        return None
    return RankFile(None if m["full"] else int(m["dp"]), int(m["tp"]), int(m["pp"]), None if m["ep"] is None else int(m["ep"]))


def manifest_entries(manifest: dict | None) -> dict[str, dict]:
    """A manifest's ``files`` as ``{name: entry}`` (empty without a manifest or a usable list)."""
    listed = (manifest or {}).get("files")
    return {f["name"]: f for f in listed if isinstance(f, dict) and "name" in f} if isinstance(listed, list) else {}


def checked_file_entries(manifest: dict, path: Path) -> dict[str, dict]:
    """:func:`manifest_entries` of a manifest whose ``files`` must be well formed: a list of
    ``{name, size, crc32}`` entries, crc32 as hex text, every name inside the tag; FormatError naming ``path`` otherwise."""
    if not _files_ok(manifest.get("files")):
        raise FormatError(f"{path}: the manifest's {_BAD_FILES}")
    return manifest_entries(manifest)


_HEX = frozenset("0123456789abcdef")
_BAD_FILES = "'files' is not a list of {name, size, crc32} entries naming files inside the tag"


def _files_ok(files: Any) -> bool:
    return isinstance(files, list) and all(map(file_entry_ok, files))


def file_entry_ok(entry: Any) -> bool:
    """True for a manifest's file entry as shardwise writes it (a tag's ``files``, an archive's or
    folder's ``members``): ``{name, size, crc32}``, a name inside the folder (:func:`is_inside`), a
    whole size, the CRC-32 as 8 hex digits."""
    crc = entry.get("crc32") if isinstance(entry, dict) else None
    return (
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and is_inside(entry["name"]) and _is_count(entry.get("size"))
        and isinstance(crc, str) and len(crc) == 8 and _HEX.issuperset(crc.lower())
    )


def is_inside(name: str) -> bool:
    """True for a relative ``/``-separated name that stays inside its folder: not absolute, no ``..``,
    ``.`` or empty parts, no backslash or NUL (a manifest naming ``/etc/passwd`` or ``../x`` is damaged)."""
    return bool(name) and "\\" not in name and "\0" not in name and all(part not in ("", ".", "..") for part in name.split("/"))


def _is_count(value: Any, least: int = 0) -> bool:
    return type(value) is int and value >= least


def _layout_ok(layout: Any) -> bool:
    return (
        isinstance(layout, dict) and all(_is_count(layout.get(axis), 1) for axis in ("tp", "pp", "dp"))
        and layout.get("optimizer") in OPTIMIZER_KINDS and ("ep" not in layout or _is_count(layout["ep"], 1))
    )


def manifest_problem(document: Any, encodings: tuple[str, ...]) -> str | None:
    """Why ``document`` (parsed JSON) cannot be a tag's manifest, or None when it can.

    A usable manifest is an object of this ``format`` whose ``files`` are well formed (see
    :func:`checked_file_entries`), whose ``sequence`` (when given) is a whole number >= 1, whose
    ``layout`` (when given) holds ``tp``, ``pp``, ``dp`` >= 1 and one of OPTIMIZER_KINDS, and whose
    ``encoding`` (when given) is one of ``encodings``. Everything that reads a tag's manifest relies
    on this, so a flipped bit makes the tag damaged rather than an error for the whole folder.
    """
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        return f"not a {MANIFEST_FORMAT} manifest"
    if not _files_ok(document.get("files")):
        return _BAD_FILES
    if "sequence" in document and not _is_count(document["sequence"], 1):
        return "its 'sequence' is not a whole number of at least 1"
    if "layout" in document and not _layout_ok(document["layout"]):
        return f"its 'layout' does not give tp, pp, dp >= 1 and an optimizer of {', '.join(OPTIMIZER_KINDS)}"
    if "encoding" in document and document["encoding"] not in encodings:
        return f"its 'encoding' is not one of {', '.join(encodings)}"
    return None




def manifest_document(tag: str, sequence: int, encoding: str, layout: dict, files: list[dict]) -> dict:
    """The manifest of one tag. ``layout`` holds ``tp``, ``pp``, ``dp`` and ``optimizer`` (one of
    OPTIMIZER_KINDS); ``files`` lists ``{"name", "size", "crc32"}`` (crc32 as 8 hex digits), sorted by name."""
    from .. import __version__

    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "created_by": f"shardwise {__version__}",
        "tag": tag, "sequence": sequence, "encoding": encoding, "layout": layout,
        "files": sorted(files, key=lambda f: f["name"]),
    }
