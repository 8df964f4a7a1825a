"""Reading a small JSON document that must be an object (configs, indexes, manifests)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError

__all__ = ["read_json_object"]


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; FormatError naming the file and ``what`` it should be otherwise."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return document
