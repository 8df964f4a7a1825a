"""NeMo's training-checkpoint layout: one Lightning ``.ckpt`` per model-parallel rank.

``<folder>/mp_rank_XX/<name>.ckpt`` (PP=1) or ``<folder>/tp_rank_XX_pp_rank_XXX/<name>.ckpt``,
written by DP-rank-0 processes. :func:`find_rank_checkpoints` finds them for one checkpoint name.
"""

from __future__ import annotations

from pathlib import Path

from ..archive.layout import parse_rank_folder
from ..errors import FormatError, OptionError

__all__ = ["has_rank_folders", "find_rank_checkpoints"]


def _rank_dirs(folder: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for child in sorted(folder.iterdir()):
        parsed = parse_rank_folder(child.name) if child.is_dir() else None
        if parsed:
            found[parsed[:2]] = child
    return found


def has_rank_folders(folder: Path) -> bool:
    return folder.is_dir() and bool(_rank_dirs(folder))


def find_rank_checkpoints(folder: Path, name: str | None) -> tuple[int, int, dict[tuple[int, int], Path]]:
    """(TP, PP, {(tp_rank, pp_rank): file}) for checkpoint ``name`` in every rank folder.

    Without ``name``, each rank folder must hold exactly one ``.ckpt`` file (else OptionError
    listing the candidates). A missing rank, or a distributed checkpoint (a folder of that name),
    is a FormatError naming what is missing.
    """
    ranks = _rank_dirs(folder)
    if not ranks:
        raise FormatError(f"{folder}: no mp_rank_XX or tp_rank_XX_pp_rank_XXX folders")
    if name is None:
        candidates = sorted({p.name for d in ranks.values() for p in d.glob("*.ckpt")})
        if len(candidates) != 1:
            shown = ", ".join(candidates[:8]) or "none"
            raise OptionError(f"{folder}: pass --checkpoint-name to choose among the rank folders' checkpoints ({shown})")
        name = candidates[0]
    if (folder / name).is_dir() or (folder / Path(name).stem).is_dir():
        raise FormatError(f"{folder / name}: is a distributed checkpoint folder; converting those arrives with distributed-checkpoint support")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    files = {}
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            directory = ranks.get((tp_rank, pp_rank))
            path = directory / name if directory is not None else None
            if path is None or not path.is_file():
                where = f"rank tp={tp_rank}, pp={pp_rank}" if directory is None else str(path)
                raise FormatError(f"{folder}: checkpoint {name} is incomplete: {where} is missing (TP={tp}, PP={pp})")
            files[(tp_rank, pp_rank)] = path
    return tp, pp, files
