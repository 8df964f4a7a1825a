"""``zero-convert``: change the DP sharding of a checkpoint's ZeRO-1 optimizer state, offline.

The input is one checkpoint tag folder in NxD's layout (``checkpoint``, ``model/``, ``optim/``,
``scheduler.pt``, ...), the folder NxD's ``nxd_convert_zero_checkpoints --input_dir`` takes. The
output is a complete checkpoint tag: the optimizer files of every (ep, tp, pp) merged over DP into
``optim/full_[ep_rank_EE_]tp_rank_TT_pp_rank_PP.pt`` (``to_full``) or re-split into
``optim/dp_rank_DD_...`` files for ``dp`` ranks, everything else copied byte for byte, a fresh
``shardwise.json`` manifest (sizes, CRC-32s, layout) and ``done`` last when the input had one. The
output appears atomically, complete or not at all. TP, PP and EP stay as they are.

Inputs are checked before anything is converted: every optimizer file present for DP ranks
0..D-1 of every (ep, tp, pp) cell (or one ``full_`` file per cell), the same D everywhere, the
sizes and CRC-32s of the input's manifest when it has one. Files are unpickled with
``torch.load(weights_only=True)`` (tensors, containers, numbers, ``torch.Size``) after
shardwise's restricted reader accepted them, unless ``trust_pickle``. Only files inside ``src``
are read: manifest names that leave it (absolute, ``..``, through a symbolic link) are refused,
and so are states whose tensors declare more bytes than the file stores (see :mod:`.zero1`).
Peak memory is about three times one cell's optimizer state (its DP files, the merged state,
the new shards). xser optimizer files (``.tensors`` folders) are refused for now.

>>> zero_convert("ckpts/step_100", "ckpts_dp8/step_100", to_full=False, dp=8)  # doctest: +SKIP
ZeroConvertResult(path=PosixPath('ckpts_dp8/step_100'), ...)
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..archive.layout import grid_of
from ..atomic import atomic_output, durable_close, fsync_dir, write_text_durably
from ..checksum import crc32
from ..errors import FormatError, LayoutError, OptionError
from ..jsonfile import document_bytes, read_json_object
from ..units import CHUNK_BYTES
from .files import check_against, check_file, save_object, torch_load
from .layout import DONE, MANIFEST, MARKER, checked_file_entries, full_optim_file, manifest_document, manifest_entries, optim_file, parse_rank_file
from .zero1 import is_zero1_state, merge_zero1, split_zero1
from ..storage import accepts_urls

__all__ = ["zero_convert", "ZeroConvertResult"]

OPTIM = "optim"
_NOT_COPIED = {OPTIM, MANIFEST, DONE}  # rewritten, not copied


@dataclass(frozen=True)
class ZeroConvertResult:
    """What :func:`zero_convert` wrote: ``written`` optimizer files and ``copied`` files, relative to ``path``."""

    path: Path
    written: list[str]
    copied: list[str]
    dp: int
    optimizer: str  # the manifest's layout["optimizer"]: "zero1" or "zero1-full"
    seconds: float


@dataclass(frozen=True)
class _Cells:
    """The optimizer files of a tag: per (ep, tp, pp), its files in DP order (one ``full_`` file when merged)."""

    files: dict[tuple[int | None, int, int], list[Path]]
    dp: int | None  # None for full files
    tp: int
    pp: int


@accepts_urls(inputs=("src",), outputs=("dst",))
def zero_convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to_full: bool,
    dp: int | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> ZeroConvertResult:
    """Write ``dst``, a copy of the checkpoint tag ``src`` whose ZeRO-1 optimizer state is merged
    (``to_full``) or sharded over ``dp`` DP ranks (input sharded or full).

    One process, no torch.distributed; ``src`` is only read. Raises OptionError for bad options,
    FormatError / LayoutError / IntegrityError / UnsafeCheckpointError naming the file for bad
    input (nothing is written then), OutputExistsError when ``dst`` exists without ``overwrite``.
    """
    started = time.perf_counter()
    _check_options(to_full, dp)
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    manifest = _read_manifest(src)
    listed = manifest_entries(manifest)
    cells = _optim_cells(src / OPTIM)
    _check_listed(src, listed)
    old = manifest or {}
    old_layout = old["layout"] if isinstance(old.get("layout"), dict) else {}
    src_dp = cells.dp or (old_layout["dp"] if type(old_layout.get("dp")) is int and old_layout["dp"] >= 1 else 1)
    out_dp = src_dp if to_full else dp
    with atomic_output(dst, is_dir=True, overwrite=overwrite) as stage:
        written = []
        for (ep, tp, pp), paths in sorted(cells.files.items(), key=lambda item: _order(*item[0])):
            label = str(paths[0].parent / re.sub(r"^dp_rank_\d+", "dp_rank_*", paths[0].name))
            full = merge_zero1([_load_state(path, trust_pickle) for path in paths], label)
            if to_full:
                written.append(_save(full, stage, full_optim_file(tp, pp, ep)))
            else:  # one rank's state at a time: peak memory is the full state plus one shard
                written += [_save(split_zero1(full, dp, label, only=r)[0], stage, optim_file(r, tp, pp, ep)) for r in range(dp)]
            del full
        copied = _copy_tag(src, stage, listed)
        files = written + copied
        for folder in sorted({(stage / f["name"]).parent for f in files}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        layout = {"tp": cells.tp, "pp": cells.pp, "dp": out_dp, "optimizer": "zero1-full" if to_full else "zero1"}
        if "ep" in old_layout:
            layout["ep"] = old_layout["ep"]
        sequence, encoding = old.get("sequence"), old.get("encoding")
        document = manifest_document(
            tag=dst.name, sequence=sequence if type(sequence) is int else 1,
            encoding=encoding if isinstance(encoding, str) else "pt", layout=layout, files=files,
        )
        for key, value in old.items():  # what this conversion does not change (model_config, ...)
            document.setdefault(key, value)
        write_text_durably(stage / MANIFEST, document_bytes(document))
        if (src / DONE).is_file():
            write_text_durably(stage / DONE, "1")
    return ZeroConvertResult(
        dst, [f["name"] for f in written], [f["name"] for f in copied], out_dp, layout["optimizer"], time.perf_counter() - started,
    )


def _check_options(to_full: bool, dp: int | None) -> None:
    if to_full and dp is not None:
        raise OptionError(f"--dp {dp} only applies with --to-sharded; --to-full merges every DP rank into one file")
    if not to_full:
        if dp is None:
            raise OptionError("--to-sharded needs --dp N, the number of DP ranks to split the optimizer state over")
        if type(dp) is not int or dp < 1:
            raise OptionError(f"--dp {dp!r}: the number of DP ranks must be a whole number of at least 1")


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise FormatError(f"{src}: no such checkpoint folder" if not src.exists() else f"{src}: not a folder; give a checkpoint tag folder")
    if not (src / MARKER).is_file():
        raise FormatError(f"{src}: not a checkpoint tag (no '{MARKER}' marker file); give the tag folder that holds model/ and optim/")
    if (src / OPTIM).is_symlink():
        raise FormatError(f"{src / OPTIM}: a symbolic link; zero-convert reads only files inside the checkpoint folder")
    if not (src / OPTIM).is_dir():
        raise FormatError(f"{src}: has no {OPTIM}/ folder, so there is no optimizer state to convert")
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise OptionError(f"{dst}: the output must not be the input {src}, inside it, or a folder that holds it")


def _check_listed(src: Path, listed: dict) -> None:
    """Every file the manifest lists (names already checked to be relative, without ``..``) exists
    inside ``src`` with its size, and optim/ files with their CRC-32; FormatError for one that a
    symbolic link places outside the tag, which is never read."""
    root = src.resolve()
    for name, entry in listed.items():
        path = src / name
        if root not in path.resolve().parents:
            raise FormatError(f"{path}: a symbolic link out of the checkpoint folder; zero-convert reads only files inside it")
        check_file(path, entry, verify=name.startswith(f"{OPTIM}/"))


def _read_manifest(src: Path) -> dict | None:
    path = src / MANIFEST
    if not path.is_file():
        return None
    document = read_json_object(path, "the checkpoint manifest")
    checked_file_entries(document, path)
    return document


def _optim_cells(folder: Path) -> _Cells:
    """The optimizer files of ``folder`` grouped by (ep, tp, pp), after checking every cell is complete."""
    found: dict[tuple[int | None, int, int], dict[int | None, Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.endswith((".tensors", ".info.pt")):
            raise FormatError(f"{entry}: xser optimizer files are not supported yet; save the optimizer without xser (use_xser=False) to convert it")
        rank = parse_rank_file(entry.name) if entry.is_file() and not entry.is_symlink() else None
        if rank is None:
            raise FormatError(f"{entry}: not an optimizer file; {folder} may only hold dp_rank_DD[_ep_rank_EE]_tp_rank_TT_pp_rank_PP.pt or full_... files")
        cell = found.setdefault((rank.ep, rank.tp, rank.pp), {})
        if rank.dp in cell:
            raise LayoutError(f"{entry}: names the same ranks as {cell[rank.dp].name}")
        cell[rank.dp] = entry
    if not found:
        raise FormatError(f"{folder}: holds no optimizer files")
    full = {key for key, cell in found.items() if None in cell}
    for key in full:
        if len(found[key]) > 1:
            raise LayoutError(f"{found[key][None]}: a merged file and dp_rank files for the same ranks; keep one of the two")
    if full and len(full) != len(found):
        raise LayoutError(f"{folder}: mixes merged (full_) and per-DP-rank optimizer files")
    sizes = {}
    for (ep, tp, pp), cell in found.items():
        if None in cell:
            continue
        missing = [r for r in range(max(cell) + 1) if r not in cell]
        if missing:
            raise LayoutError(f"{folder.parent / optim_file(missing[0], tp, pp, ep)}: missing; DP ranks {sorted(cell)} are present, so ranks 0..{max(cell)} are expected")
        sizes.setdefault(len(cell), (ep, tp, pp))
    if len(sizes) > 1:
        (d1, c1), (d2, c2) = list(sizes.items())[:2]
        raise LayoutError(f"{folder}: {_cell(*c1)} has DP={d1} but {_cell(*c2)} has DP={d2}; every TP/PP rank needs the same DP ranks")
    eps = sorted({ep for ep, _, _ in found}, key=_order)
    if None in eps and len(eps) > 1:
        raise LayoutError(f"{folder}: mixes file names with and without ep_rank")
    if eps != [None] and eps != list(range(len(eps))):
        raise LayoutError(f"{folder}: EP ranks {eps} are not 0..{len(eps) - 1}")
    grids = set()
    for ep in eps:
        tp, pp, gap = grid_of({(t, p) for e, t, p in found if e == ep})
        if gap is not None:
            name = optim_file(0, *gap, ep) if not full else full_optim_file(*gap, ep)
            raise LayoutError(f"{folder.parent / name}: missing; the other files span TP={tp} x PP={pp}")
        grids.add((tp, pp))
    if len(grids) > 1:
        raise LayoutError(f"{folder}: EP ranks span different TP x PP grids {sorted(grids)}")
    tp, pp = grids.pop()
    files = {key: [cell[r] for r in sorted(cell, key=_order)] for key, cell in found.items()}
    return _Cells(files, None if full else sizes.popitem()[0], tp, pp)


def _order(*ranks: int | None) -> tuple[int, ...]:
    """A sort key for rank tuples in which None (no EP, a merged file) comes first."""
    return tuple(-1 if r is None else r for r in ranks)


def _cell(ep: int | None, tp: int, pp: int) -> str:
    """``[ep_rank_EE_]tp_rank_TT_pp_rank_PP``, for messages."""
    return full_optim_file(tp, pp, ep)[len(f"{OPTIM}/full_"):-len(".pt")]


def _load_state(path: Path, trust_pickle: bool) -> dict:
    """A DP rank's optimizer state, unpickled safely; FormatError unless it is a ZeRO-1 state."""
    state = torch_load(path, trust_pickle)
    if not is_zero1_state(state):
        raise FormatError(
            f"{path}: not a ZeRO-1 optimizer state (no base_state and shape_info): a replicated optimizer state "
            f"is the same on every DP rank and needs no conversion"
        )
    return state


def _save(state: dict, stage: Path, name: str) -> dict:
    """``torch.save`` into the staging folder, fsynced; the manifest entry of the file."""
    size, crc = save_object(state, stage / name)
    return {"name": name, "size": size, "crc32": f"{crc:08x}"}


def _copy_tag(src: Path, stage: Path, listed: dict) -> list[dict]:
    """Copy every file of the tag except optim/, the manifest and done; checked against ``listed`` as it goes."""
    entries = []
    for root, dirs, names in os.walk(src):
        rel = Path(root).relative_to(src)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in _NOT_COPIED]
            names = [n for n in names if n not in _NOT_COPIED]
        dirs.sort()
        for d in dirs:
            if (Path(root) / d).is_symlink():
                raise FormatError(f"{Path(root) / d}: a symbolic link; zero-convert copies plain files and folders only")
        (stage / rel).mkdir(exist_ok=True)
        for n in sorted(names):
            path, name = Path(root) / n, (rel / n).as_posix()
            if path.is_symlink() or not path.is_file():
                raise FormatError(f"{path}: not a plain file; zero-convert copies plain files and folders only")
            size, crc = _copy_file(path, stage / name)
            if name in listed:
                check_against(path, listed[name], size, crc)
            entries.append({"name": name, "size": size, "crc32": f"{crc:08x}"})
    return entries


def _copy_file(src: Path, dst: Path) -> tuple[int, int]:
    size = crc = 0
    with open(src, "rb", buffering=0) as fin:
        fout = open(dst, "wb")
        try:
            while chunk := fin.read(CHUNK_BYTES):
                crc = crc32(chunk, crc)
                size += len(chunk)
                fout.write(chunk)
        finally:
            durable_close(fout)
    return size, crc
