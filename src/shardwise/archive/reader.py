"""Opening a ``.nemo``-style archive in place: members, config, layout, artifacts and weights.

Nothing is extracted to read an archive: the tar headers give every member's offset, the config
and manifest are read from there, and weights (safetensors or torch files) are opened as
:class:`~shardwise.formats.region.Region` s of the archive, so their tensors are read directly
from it. Only :meth:`Archive.extract` writes files, and only for the members asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_all
from ..errors import FormatError, LayoutError
from ..formats.safetensors import SafetensorsFile
from ..formats.torch_pickle import TorchFile
from ..tensors import FileTensorSource, StoredTensor, TensorInfo
from .artifacts import references
from .layout import CONFIG_NAME, DISTRIBUTED_FOLDER, MANIFEST_NAME, ArchiveLayout, detect_layout, parse_rank_folder
from .manifest import read_manifest
from .tar_index import TarIndex, TarMember, open_tar, unsafe_reason

__all__ = ["Archive", "RankPrefixedSource", "read_yaml_config"]

_MAX_CONFIG = 64 << 20


def read_yaml_config(raw: bytes, label: str) -> dict:
    """A YAML config (safe loader: no Python objects are built) that must be a mapping."""
    try:
        config = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise FormatError(f"{label}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise FormatError(f"{label}: the config is a {type(config).__name__}, not a mapping")
    return config


class RankPrefixedSource(FileTensorSource):
    """The tensors of every rank of a sharded archive, named ``<rank folder>/<tensor name>``."""

    def __init__(self, parts: dict[str, FileTensorSource]) -> None:
        super().__init__()
        for folder, part in parts.items():
            for name in part.keys():
                entry = part.stored(name)
                info = TensorInfo(f"{folder}/{name}", entry.info.shape, entry.info.dtype)
                self._tensors[info.name] = StoredTensor(info, entry.path, entry.offset, entry.strides)
            part.close()


class Archive:
    """A lazily opened archive (NeMo ``.nemo`` or shardwise), uncompressed or gzip.

    ``config`` is ``model_config.yaml`` as written (with ``nemo:`` references, and a top-level
    ``model:`` wrapper if the file has one); ``layout`` says where the weights are; ``manifest`` is
    the shardwise manifest or None. Close it (or use ``with``) to release a gzip archive's
    temporary copy.

    >>> with Archive("model.nemo") as archive:  # doctest: +SKIP
    ...     archive.layout.tp, archive.weights().keys()[:2]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.index: TarIndex = open_tar(self.path)
        try:
            self.layout: ArchiveLayout = detect_layout([m.name for m in self.index.files()], self.path)
            self.config: dict = self._read_config()
            self.manifest: dict | None = read_manifest(self.index)
        except BaseException:
            self.index.close()
            raise

    # -- config and members --------------------------------------------------------------------
    def _read_config(self) -> dict:
        member = self.index.get(CONFIG_NAME)
        if member is None or member.kind != "file":
            raise FormatError(f"{self.path}: not a model archive: it has no {CONFIG_NAME}")
        if member.size > _MAX_CONFIG:
            raise FormatError(f"{self.path}: {CONFIG_NAME} of {member.size} bytes is implausibly large")
        return read_yaml_config(self.read_bytes(member), f"{self.path}:{member.raw_name}")

    @property
    def model_config(self) -> dict:
        """The config a model is built from: NeMo unwraps a top-level ``model:`` mapping."""
        inner = self.config.get("model")
        return inner if isinstance(inner, dict) else self.config

    def read_bytes(self, member: TarMember) -> bytes:
        with open(self.index.path, "rb") as f:
            return os.pread(f.fileno(), member.size, member.offset)

    def members(self) -> list[dict]:
        return [{"name": m.name, "kind": m.kind, "size": m.size} for m in self.index.members.values() if m.name]

    def artifacts(self) -> list[dict]:
        """Top-level members that are neither config, manifest nor weights, with the config keys naming them."""
        referenced: dict[str, list[str]] = {}
        for key, member in references(self.config):
            referenced.setdefault(member, []).append(key)
        out = []
        for member in self.index.members.values():
            name = member.name
            if not name or "/" in name or name in (CONFIG_NAME, MANIFEST_NAME, DISTRIBUTED_FOLDER):
                continue
            if parse_rank_folder(name) or name in self.layout.shards.values():
                continue
            inside = self.index.under(name) if member.kind == "dir" else [member]
            out.append({
                "name": name,
                "kind": member.kind,
                "files": sum(1 for m in inside if m.kind == "file"),
                "size": sum(m.size for m in inside),
                "referenced_by": referenced.pop(name, []),
            })
        for name, keys in referenced.items():
            out.append({"name": name, "kind": "missing", "files": 0, "size": 0, "referenced_by": keys})
        return out

    # -- weights -------------------------------------------------------------------------------
    def weights(self, tp_rank: int = 0, pp_rank: int = 0, *, trust_pickle: bool = False) -> FileTensorSource:
        """The tensors of one rank's weights file, read in place (no extraction)."""
        layout = self.layout
        if layout.kind == "distributed":
            raise LayoutError(
                f"{self.path}: the weights are a distributed checkpoint ({DISTRIBUTED_FOLDER}/, "
                f"{len(layout.distributed_files)} files); this version of shardwise reports it but does not read it"
            )
        member = layout.shards.get((tp_rank, pp_rank))
        if member is None:
            raise LayoutError(f"{self.path}: no weights for tp_rank={tp_rank}, pp_rank={pp_rank}; the archive has TP={layout.tp}, PP={layout.pp}")
        region = self.index.region(member)
        if layout.weights_format == "safetensors":
            return SafetensorsFile(region)
        return TorchFile(region, trust=trust_pickle)

    def all_weights(self, *, trust_pickle: bool = False) -> FileTensorSource:
        """Every rank's tensors: the weights themselves when unsharded, else rank-prefixed (see RankPrefixedSource)."""
        if not self.layout.sharded:
            return self.weights(trust_pickle=trust_pickle)
        parts = {}
        for (tp_rank, pp_rank), member in sorted(self.layout.shards.items()):
            parts[member.rpartition("/")[0]] = self.weights(tp_rank, pp_rank, trust_pickle=trust_pickle)
        return RankPrefixedSource(parts)

    # -- extraction ----------------------------------------------------------------------------
    def extract(self, names: list[str], dest: Path) -> None:
        """Copy members ``names`` (files, or folders with everything under them) into ``dest``.

        Unsafe members (absolute paths, ``..``, links, devices) are refused with FormatError
        before anything is written. ``dest`` must exist.
        """
        chosen: list[TarMember] = []
        for name in names:
            member = self.index.get(name)
            if member is None:
                raise FormatError(f"{self.path}: has no member {name}")
            chosen.append(member)
            if member.kind == "dir":
                chosen.extend(self.index.under(member.name))
        for member in chosen:
            reason = unsafe_reason(member)
            if reason:
                raise FormatError(f"{self.path}: refusing member {member.raw_name!r}: it {reason}")
        for member in chosen:
            target = dest / member.name
            if member.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif member.kind == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                copy_member(self.index, member, target)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def copy_member(index: TarIndex, member: TarMember, target: Path, *, chunk: int = 8 << 20) -> int:
    """Copy one member's bytes to a new file ``target`` (fsynced); returns the CRC-32 of what was copied."""
    from ..checksum import crc32

    crc, done = 0, 0
    buffer = memoryview(bytearray(min(chunk, max(member.size, 1))))
    with open(index.path, "rb", buffering=0) as src, open(target, "xb", buffering=0) as out:
        while done < member.size:
            view = buffer[: min(len(buffer), member.size - done)]
            n = os.preadv(src.fileno(), [view], member.offset + done)
            if n == 0:
                raise FormatError(f"{index.label}: member {member.raw_name} is truncated")
            crc = crc32(view[:n], crc)
            write_all(out, view[:n])
            done += n
        os.fsync(out.fileno())
    return crc
