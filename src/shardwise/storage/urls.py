"""Telling a URL (``s3://bucket/key``) from a local path, and opening the filesystem behind it.

A URL is a string with a ``scheme://`` prefix whose scheme is not ``file``; anything else is a
local path. ``pathlib`` folds ``s3://b/k`` into ``s3:/b/k``, so a URL that went through
``Path`` is recognised in that form too and restored.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import OptionError

__all__ = ["is_url", "url_text", "file_url_path", "filesystem", "join", "Remote"]

_SCHEME = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
_FOLDED = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]{1,})\:/(?!/)")  # what Path("s3://b/k") prints: s3:/b/k
_LOCAL_SCHEMES = {"file", "local"}


def url_text(value: Any) -> str | None:
    """``value`` as a URL string (a Path-folded ``s3:/b/k`` restored), or None for a local path or a non-path."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    text = os.fspath(value)
    if not isinstance(text, str):
        return None
    m = _SCHEME.match(text)
    if m:
        return None if m["scheme"].lower() in _LOCAL_SCHEMES else text
    folded = _FOLDED.match(text)
    if folded and not isinstance(value, str) and _known_scheme(folded["scheme"].lower()):
        return f"{folded['scheme']}://{text[folded.end():]}"
    return None


def file_url_path(value: Any) -> str | None:
    """The local path a ``file://`` URL names (``file:///tmp/x`` -> ``/tmp/x``), else None."""
    if isinstance(value, str) and value.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(value)
        return unquote(parsed.path) if parsed.netloc in ("", "localhost") else None
    return None


def _known_scheme(scheme: str) -> bool:
    """A remote scheme an fsspec backend is registered for (so a local folder named ``x:`` stays local)."""
    if scheme in _LOCAL_SCHEMES:
        return False
    try:
        import fsspec
    except ImportError:  # pragma: no cover
        return False
    return scheme in fsspec.available_protocols()


def is_url(value: Any) -> bool:
    """Whether ``value`` names a location on a remote filesystem (``s3://...``, ``gs://...``, ``memory://...``)."""
    return url_text(value) is not None


def join(url: str, *names: str) -> str:
    """``url`` with ``names`` appended, one ``/`` between each."""
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


class Remote:
    """One remote location: its URL, the fsspec filesystem and the filesystem's own path for it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if not url.endswith("://") else url
        self.fs, self.path = filesystem(self.url)

    def child(self, *names: str) -> "Remote":
        return Remote(join(self.url, *names))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"


def filesystem(url: str):
    """(fsspec filesystem, path within it) for ``url``; OptionError when no fsspec backend serves its scheme."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with torch
        raise OptionError(f"{url}: URLs need fsspec (pip install fsspec)") from None
    scheme = _SCHEME.match(url)["scheme"]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = " (pip install shardwise[s3])" if scheme in ("s3", "s3a") else ""
        raise OptionError(f"{url}: reading and writing {scheme}:// needs a library that is not installed{extra}: {e}") from None
    except ValueError as e:
        raise OptionError(f"{url}: {scheme}:// is not a storage scheme fsspec knows ({e})") from None
    return fs, path
