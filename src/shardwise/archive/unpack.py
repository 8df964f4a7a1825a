"""``pack`` and ``unpack``: an archive as a plain tar, made and opened safely.

``unpack`` checks every member before writing anything: absolute paths, ``..``, links, devices
and other special files are refused (FormatError, exit 2), so nothing can land outside the
target folder. Files are written into a staging folder, checked against the archive's manifest
(CRC-32) when it has one, and the folder is committed atomically. ``pack`` stores a folder's files
and sub-folders as ``./NAME`` members; when the folder is a model archive's contents it also
writes a fresh manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_output
from ..background import write_streaming
from ..errors import FormatError, OptionError
from .layout import MANIFEST_NAME, detect_layout
from .manifest import check_crc, manifest_bytes, read_manifest
from .reader import check_members, write_members
from .tar_index import open_tar
from .tar_writer import TarWriter
from ..storage import accepts_urls

__all__ = ["pack", "unpack"]


@accepts_urls(inputs=("archive",), outputs=("folder",))
def unpack(archive: str | os.PathLike, folder: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
    """Extract ``archive`` into the new folder ``folder``; returns the files written (relative names)."""
    with open_tar(archive) as index:
        manifest = read_manifest(index)
        expected = {m["name"]: m.get("crc32") for m in manifest["members"]} if manifest else {}
        members = list(index.members.values())
        check_members(index, members)  # before the staging folder: a refused archive leaves the output's parent untouched
        with atomic_output(folder, is_dir=True, overwrite=overwrite) as stage:
            crcs = write_members(index, members, stage)
            for name, crc in crcs.items():
                check_crc(index, name, crc, expected.get(name))
    return list(crcs)


@accepts_urls(inputs=("folder",), outputs=("archive",))
def pack(folder: str | os.PathLike, archive: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
    """Write ``folder``'s files into the tar ``archive`` (members ``./NAME``); returns the member names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OptionError(f"{folder}: not a folder")
    entries = []
    for path in sorted(folder.rglob("*")):
        relname = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise FormatError(f"{path}: is a link or special file; pack stores regular files and folders only")
        if relname != MANIFEST_NAME:
            entries.append((relname, path))
    files = [name for name, path in entries if path.is_file()]
    try:
        layout = detect_layout(files, str(folder)).as_dict()
    except FormatError:
        layout = None  # not a model archive's contents: a plain tar, without manifest

    def produce(sink) -> None:
        tar = TarWriter(sink)
        tar.add_dir("")
        for name, path in entries:
            if path.is_dir():
                tar.add_dir(name)
            else:
                tar.add_file(name, path)
        if layout is not None:
            tar.add_bytes(MANIFEST_NAME, manifest_bytes(tar.members, layout))
        tar.close()

    with atomic_output(archive, is_dir=False, overwrite=overwrite) as stage:
        write_streaming(stage, produce, mode="w+b")
    return files + ([MANIFEST_NAME] if layout is not None else [])
