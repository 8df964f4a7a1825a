"""``shardwise.json``: the member that NeMo archives lack, written last.

It records the format version, the weight layout, and every other regular member's size, data
offset and CRC-32, so a reader can tell a complete archive from a damaged one without trusting
the tar alone. Archives without it (NeMo's own) are read all the same; archives with a manifest
that contradicts their members are refused with an IntegrityError.

Example::

    {"format": "shardwise-archive", "version": 1, "created_by": "shardwise 0.1.0",
     "layout": {"kind": "single", "tp": 1, "pp": 1, "weights_format": "torch", ...},
     "members": [{"name": "model_config.yaml", "size": 120, "offset": 1536, "crc32": "1c291ca3"}, ...]}
"""

from __future__ import annotations


from ..errors import FormatError, IntegrityError
from ..jsonfile import document_bytes, parse_json
from .layout import MANIFEST_NAME
from .tar_index import TarIndex
from .tar_writer import WrittenMember

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "manifest_bytes", "read_manifest", "verify_members", "check_crc"]

MANIFEST_FORMAT = "shardwise-archive"
MANIFEST_VERSION = 1


def manifest_bytes(members: list[WrittenMember], layout: dict, extra: dict | None = None) -> bytes:
    """The manifest document; ``extra`` adds top-level entries (``parallel`` for sharded models)."""
    from .. import __version__

    document = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"shardwise {__version__}",
        "layout": layout,
        **(extra or {}),
        "members": [{"name": m.name, "size": m.size, "offset": m.offset, "crc32": f"{m.crc32:08x}"} for m in members],
    }
    return document_bytes(document)


def read_manifest(index: TarIndex) -> dict | None:
    """The manifest of an archive, checked against its members; None when there is none.

    FormatError when it is not a manifest this version understands; IntegrityError when a member it
    lists is missing or has another size.
    """
    member = index.get(MANIFEST_NAME)
    if member is None or member.kind != "file":
        return None
    label = f"{index.label}:{member.raw_name}"
    if member.size > 64 << 20:
        raise FormatError(f"{label}: manifest of {member.size} bytes is implausibly large")
    document = parse_json(index.read(member), label, "manifest")
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT or not isinstance(document.get("members"), list):
        raise FormatError(f"{label}: not a shardwise manifest")
    if not isinstance(document.get("version"), int) or document["version"] > MANIFEST_VERSION:
        raise FormatError(f"{label}: manifest version {document.get('version')!r} is newer than this shardwise reads (up to {MANIFEST_VERSION}); upgrade shardwise")
    for entry in document["members"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("size"), int)):
            raise FormatError(f"{label}: malformed member entry {entry!r}")
        actual = index.get(entry["name"])
        if actual is None or actual.kind != "file":
            raise IntegrityError(f"{index.label}: member {entry['name']} is listed in the manifest but missing from the archive")
        if actual.size != entry["size"]:
            raise IntegrityError(f"{index.label}: member {entry['name']} holds {actual.size} bytes; the manifest says {entry['size']}")
    return document


def verify_members(index: TarIndex, manifest: dict, names: list[str] | None = None) -> int:
    """Check the CRC-32 of the manifest's members (or only ``names``); returns bytes checked.

    Raises IntegrityError naming the first member whose bytes do not match.
    """
    wanted = None if names is None else set(names)
    checked = 0
    for entry in manifest["members"]:
        if wanted is not None and entry["name"] not in wanted:
            continue
        member = index.get(entry["name"])
        check_crc(index, entry["name"], index.stream(member), entry.get("crc32"))
        checked += member.size
    return checked


def check_crc(index: TarIndex, name: str, crc: int, expected: str | None) -> None:
    """IntegrityError naming the member when its CRC-32 is not the manifest's (None: nothing to check)."""
    if expected is not None and f"{crc:08x}" != expected:
        raise IntegrityError(f"{index.label}: member {name} is corrupted: CRC-32 {crc:08x}, the manifest says {expected}")
