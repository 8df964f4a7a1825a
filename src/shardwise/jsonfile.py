"""Small JSON documents (configs, indexes, manifests): reading one that must be an object, and the text manifests are written as."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError

__all__ = ["read_json_object", "document_bytes"]


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; FormatError naming the file and ``what`` it should be otherwise
    (also for nesting deeper than Python's recursion limit, which no real document reaches)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{path}: {what} nests too deeply to read") from None
    if not isinstance(document, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return document


def document_bytes(document: dict) -> bytes:
    """A manifest as written: JSON indented by one, a final newline, UTF-8."""
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")
