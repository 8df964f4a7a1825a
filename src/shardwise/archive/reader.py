"""Opening a ``.nemo``-style archive in place: members, config, layout, artifacts and weights.

Nothing is extracted to read an archive: the tar headers give every member's offset, the config
and manifest are read from there, and weights (safetensors or torch files, or the files of a
``model_weights/`` distributed checkpoint) are opened as :class:`~shardwise.formats.region.Region` s
of the archive, so their tensors are read directly from it. Only :meth:`Archive.extract` writes files, and only for the members asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import FormatError, LayoutError
from ..formats import MergedSource
from ..formats.dcp import DcpFiles
from ..formats.safetensors import SafetensorsFile
from ..formats.torch_dist import TorchDistSource
from ..formats.torch_pickle import TorchFile
from ..jsonfile import parse_json_object, parse_yaml
from ..tensors import FileTensorSource
from .artifacts import NEMO_PREFIX, references
from .layout import CONFIG_NAME, DISTRIBUTED_FOLDER, HF_CONFIG_KEY, MANIFEST_NAME, ArchiveLayout, detect_layout, parse_rank_folder
from .manifest import read_manifest
from .tar_index import TarIndex, TarMember, member_path, open_tar, unsafe_reason

__all__ = ["Archive", "read_yaml_config", "check_members", "write_members"]

_MAX_CONFIG = 64 << 20


def model_section(config: dict) -> dict:
    """The config a model is built from: a top-level ``model:`` mapping unwrapped, as NeMo does."""
    inner = config.get("model")
    return inner if isinstance(inner, dict) else config


def read_model_config(path: Path) -> dict:
    """A NeMo ``model_config.yaml`` file as the model's config (:func:`model_section`)."""
    return model_section(read_yaml_config(Path(path).read_bytes(), str(path)))


def read_yaml_config(raw: bytes, label: str) -> dict:
    """A YAML config (safe loader: no Python objects are built) that must be a mapping."""
    config = parse_yaml(raw, label, "the YAML config")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise FormatError(f"{label}: the config is a {type(config).__name__}, not a mapping")
    return config


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
        return read_yaml_config(self.index.read(member), f"{self.path}:{member.raw_name}")

    def hf_config(self) -> dict | None:
        """The HF config.json that the config's ``hf_config_file: nemo:<member>`` names, parsed; None
        when it names no file member. FormatError naming the member when it is implausibly large
        or not a JSON object (:func:`~shardwise.jsonfile.parse_json_object`)."""
        reference = self.config.get(HF_CONFIG_KEY)
        if not (isinstance(reference, str) and reference.startswith(NEMO_PREFIX)):
            return None
        member = self.index.get(reference[len(NEMO_PREFIX):])
        if member is None or member.kind != "file":
            return None
        label = f"{self.path}:{member.raw_name}"
        if member.size > _MAX_CONFIG:
            raise FormatError(f"{label}: the HF config (hf_config_file) of {member.size} bytes is implausibly large")
        return parse_json_object(self.index.read(member), label, "the HF config (hf_config_file)")

    @property
    def model_config(self) -> dict:
        """The config a model is built from: NeMo unwraps a top-level ``model:`` mapping."""
        return model_section(self.config)

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
        """The tensors of one rank's weights file, read in place (no extraction).

        A ``model_weights/`` distributed checkpoint holds the whole model under global keys: it is
        rank (0, 0), its layers unstacked (:class:`~shardwise.formats.torch_dist.TorchDistSource`).
        """
        layout = self.layout
        if layout.kind == "distributed":
            if (tp_rank, pp_rank) != (0, 0):
                raise LayoutError(f"{self.path}: the weights are one distributed checkpoint ({DISTRIBUTED_FOLDER}/) of global tensors; there are no per-rank files")
            return TorchDistSource(self._distributed_files(), trust=trust_pickle)
        member = layout.shards.get((tp_rank, pp_rank))
        if member is None:
            raise LayoutError(f"{self.path}: no weights for tp_rank={tp_rank}, pp_rank={pp_rank}; the archive has TP={layout.tp}, PP={layout.pp}")
        region = self.index.region(member)
        if layout.weights_format == "safetensors":
            return SafetensorsFile(region)
        return TorchFile(region, trust=trust_pickle)

    def all_weights(self, *, trust_pickle: bool = False) -> FileTensorSource:
        """Every rank's tensors: the weights themselves when unsharded, else named ``<rank folder>/<name>``."""
        if not self.layout.sharded:
            return self.weights(trust_pickle=trust_pickle)
        shards = sorted(self.layout.shards.items())
        parts = [self.weights(tp_rank, pp_rank, trust_pickle=trust_pickle) for (tp_rank, pp_rank), _ in shards]
        return MergedSource(parts, [member.rpartition("/")[0] + "/" for _, member in shards])

    def _distributed_files(self) -> DcpFiles:
        """The files directly inside ``model_weights/``, as regions of the archive (read in place)."""
        prefix = DISTRIBUTED_FOLDER + "/"
        regions = {
            m.name[len(prefix):]: self.index.region(m.name)
            for m in self.index.under(DISTRIBUTED_FOLDER) if m.kind == "file" and "/" not in m.name[len(prefix):]
        }
        return DcpFiles(f"{self.path}:{DISTRIBUTED_FOLDER}", regions)

    # -- extraction ----------------------------------------------------------------------------
    def extract(self, names: list[str], dest: Path) -> None:
        """Copy members ``names`` (files, or folders with everything under them) into ``dest``
        (see :func:`write_members`: unsafe members are refused before anything is written)."""
        for name in names:
            write_members(self.index, self.member_tree(name), dest)

    def member_tree(self, name: str) -> list[TarMember]:
        """Member ``name`` and, for a folder, everything under it; FormatError if there is no such member."""
        member = self.index.get(name)
        if member is None:
            raise FormatError(f"{self.path}: has no member {name}")
        return [member, *self.index.under(member.name)] if member.kind == "dir" else [member]

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_members(index: TarIndex, members: list[TarMember]) -> None:
    """FormatError naming the first of ``members`` that is unsafe to extract (:func:`unsafe_reason`:
    an absolute path once normalised, ``..``, the root stored as a file, links, devices and other
    special files); checks names only, so it may run before the target exists."""
    for member in members:
        reason = unsafe_reason(member)
        if reason:
            raise FormatError(f"{index.label}: refusing member {member.raw_name!r}: it {reason}; nothing was written")


def write_members(index: TarIndex, members: list[TarMember], dest: Path, relname: Callable[[TarMember], str] | None = None) -> dict[str, int]:
    """Write folder and file ``members`` under ``dest`` (at ``relname(member)``, default their names).

    Every member is checked first (:func:`check_members`), and every destination is resolved
    under ``dest`` (:func:`~shardwise.archive.tar_index.member_path`: no absolute path, no ``..``,
    no symbolic link on the way), before anything is written, so nothing lands outside ``dest``.
    Each file is written under a temporary name, fsynced and renamed into place, so a file of the
    same name (the same artifact restored before into the caller's ``artifacts_dir``) is replaced
    whole, and a link there is replaced rather than followed. Returns each written file's CRC-32
    by member name, for checking against a manifest.
    """
    check_members(index, members)
    targets = []
    for member in members:
        name = relname(member) if relname else member.name
        if member.kind == "dir" and not name:
            continue  # the archive root: dest itself
        targets.append((member, member_path(dest, name, index.label, folder=member.kind == "dir")))
    crcs = {}
    for member, target in targets:
        if member.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.shardwise-part")
            try:
                with open(partial, "xb", buffering=0) as out:
                    crcs[member.name] = index.stream(member, out)
                    os.fsync(out.fileno())
                os.replace(partial, target)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
    return crcs
