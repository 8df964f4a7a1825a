"""Artifacts: files and folders (tokenizers, vocabularies) that travel inside an archive.

As in NeMo, an artifact is stored at the archive root as ``<32 hex>_<basename>`` and the config
value that pointed at it becomes ``nemo:<32 hex>_<basename>``. NeMo draws the 32 hex digits at
random (``uuid4().hex``); shardwise derives them from the artifact's content (SHA-256), so saving
the same model twice gives the same member names, and NeMo reads them the same way.

Config paths are dotted (``tokenizer.tokenizer_model``); a missing intermediate mapping is created.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import FormatError, OptionError
from .tar_index import normalize_name, unsafe_name

__all__ = ["NEMO_PREFIX", "HASHED_PREFIX", "PlannedArtifact", "config_value", "make_artifact", "folder_entries", "plan_artifacts", "references", "resolve_references", "set_config_value"]

NEMO_PREFIX = "nemo:"
HASHED_PREFIX = re.compile(r"^[0-9a-f]{32}_(?=.)")  # an artifact restored from an archive keeps one hash, not two


@dataclass(frozen=True)
class PlannedArtifact:
    """One artifact to pack: its member name, the files it holds, and the config key naming it.

    A file artifact has one entry with relative name ""; a folder artifact lists its files by
    relative POSIX name (sub-folders are implied by the names).
    """

    member: str
    entries: tuple[tuple[str, Path], ...]
    config_key: str
    is_dir: bool


def folder_entries(folder: Path) -> tuple[tuple[str, Path], ...]:
    """(relative name, path) of every regular file under ``folder``, sorted; links and special files are refused."""
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise OptionError(f"{path}: artifact folders may hold only regular files and folders")
        if path.is_file():
            out.append((path.relative_to(folder).as_posix(), path))
    return tuple(out)


def content_digest(entries: tuple[tuple[str, Path], ...]) -> str:
    """32 hex digits of SHA-256 over the entries' relative names and bytes."""
    digest = hashlib.sha256()
    for name, path in entries:
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def make_artifact(config_key: str, name: str, entries: tuple[tuple[str, Path], ...], is_dir: bool) -> PlannedArtifact:
    """An artifact named ``<digest>_<name>`` from explicit entries (e.g. a subset of a folder)."""
    return PlannedArtifact(f"{content_digest(entries)}_{name}", entries, config_key, is_dir)


def config_value(config: dict, key: str) -> Any:
    """``config[a][b][c]`` for ``key = "a.b.c"``, or None where the path does not exist."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def set_config_value(config: dict, key: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``key = "a.b.c"``, creating missing mappings."""
    node = config
    *parents, last = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise OptionError(f"artifact key {key!r}: config value {part!r} is not a mapping")
        node = child
    node[last] = value


def plan_artifacts(config: dict, artifacts: dict[str, str | os.PathLike]) -> list[PlannedArtifact]:
    """Name each artifact and rewrite ``config`` (in place) to point at it with ``nemo:``.

    ``artifacts`` maps a dotted config key to a local file or folder; OptionError if one is missing.
    """
    planned: dict[str, PlannedArtifact] = {}
    for key, source in artifacts.items():
        path = Path(source)
        if not path.exists():
            raise OptionError(f"{path}: artifact {key!r} does not exist")
        if not (path.is_file() or path.is_dir()):
            raise OptionError(f"{path}: artifact {key!r} is neither a regular file nor a folder")
        entries = folder_entries(path) if path.is_dir() else (("", path),)
        artifact = make_artifact(key, HASHED_PREFIX.sub("", path.resolve().name), entries, path.is_dir())
        planned.setdefault(artifact.member, artifact)
        set_config_value(config, key, NEMO_PREFIX + artifact.member)
    return list(planned.values())


def references(config: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every ``(dotted key, member)`` whose config value is ``nemo:member``."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield from references(value, f"{prefix}{key}.")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            yield from references(value, f"{prefix}{i}.")
    elif isinstance(config, str) and config.startswith(NEMO_PREFIX):
        yield prefix[:-1], config[len(NEMO_PREFIX):]


def resolve_references(config: Any, folder: Path | None, label: str) -> Any:
    """A copy of ``config`` with each ``nemo:X`` replaced by the path ``folder/X`` (which must exist);
    FormatError for an ``X`` that could name a path outside ``folder`` (absolute, ``..``)."""
    if isinstance(config, dict):
        return {k: resolve_references(v, folder, label) for k, v in config.items()}
    if isinstance(config, list):
        return [resolve_references(v, folder, label) for v in config]
    if isinstance(config, str) and config.startswith(NEMO_PREFIX):
        name = normalize_name(config[len(NEMO_PREFIX):])
        reason = unsafe_name(name)
        if reason:
            raise FormatError(f"{label}: the config refers to {config}, a member name that {reason}; refusing it")
        path = folder / name if folder is not None and name else None
        if path is None or not path.exists():
            raise FormatError(f"{label}: the config refers to {config}, which the archive does not hold")
        return str(path)
    return config
