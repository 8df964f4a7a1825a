"""Where an archive keeps its weights: NeMo's member names, as data and pure functions (no I/O).

- unsharded: ``model_weights.ckpt`` (or ``model_weights.safetensors``) at the root;
- tensor parallel only (PP=1): ``mp_rank_{tp:02d}/model_weights.ckpt`` per TP rank;
- pipeline parallel (PP>1, any TP): ``tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt``;
- a distributed checkpoint: a ``model_weights/`` folder (``.metadata``, ``*.distcp``, ``common.pt``).

The same folder names are used by NeMo's Lightning training checkpoints
(``mp_rank_00/NAME.ckpt``), so :func:`parse_rank_folder` serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import FormatError, LayoutError

__all__ = [
    "CONFIG_NAME", "MANIFEST_NAME", "HF_CONFIG_KEY", "WEIGHTS_NAMES", "DISTRIBUTED_FOLDER",
    "ArchiveLayout", "rank_folder", "parse_rank_folder", "detect_layout", "grid_of", "ranks_of_process",
]

CONFIG_NAME = "model_config.yaml"
MANIFEST_NAME = "shardwise.json"
HF_CONFIG_KEY = "hf_config_file"  # the config key naming the HF config.json artifact (nemo:<member>)
WEIGHTS_NAMES = {"model_weights.ckpt": "torch", "model_weights.safetensors": "safetensors"}
DISTRIBUTED_FOLDER = "model_weights"

_MP = re.compile(r"mp_rank_(\d{2,})")
_TP_PP = re.compile(r"tp_rank_(\d{2,})_pp_rank_(\d{3,})")
_FSDP = re.compile(r"(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)_fsdp_shard_\d+")


def rank_folder(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """NeMo's folder for one rank's weights: "" when unsharded, ``mp_rank_XX`` when PP=1, else ``tp_rank_XX_pp_rank_XXX``."""
    if tp == 1 and pp == 1:
        return ""
    if pp == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}"


def parse_rank_folder(name: str) -> tuple[int, int, str] | None:
    """``mp_rank_03`` -> (3, 0, "mp"); ``tp_rank_01_pp_rank_002`` -> (1, 2, "tp_pp"); else None."""
    if m := _MP.fullmatch(name):
        return int(m.group(1)), 0, "mp"
    if m := _TP_PP.fullmatch(name):
        return int(m.group(1)), int(m.group(2)), "tp_pp"
    return None


@dataclass(frozen=True)
class ArchiveLayout:
    """How an archive's weights are laid out.

    ``kind`` is ``single``, ``sharded`` (one weights file per TP/PP rank) or ``distributed``
    (a ``model_weights/`` distributed checkpoint, reported but not read by this version).
    ``shards`` maps (tp_rank, pp_rank) to the weights member; ``weights_format`` is torch or safetensors.
    """

    kind: str
    tp: int = 1
    pp: int = 1
    weights_format: str | None = None
    shards: dict[tuple[int, int], str] = field(default_factory=dict)
    distributed_files: tuple[str, ...] = ()

    @property
    def sharded(self) -> bool:
        return self.kind == "sharded"

    def as_dict(self) -> dict:
        out: dict = {"kind": self.kind, "tp": self.tp, "pp": self.pp, "weights_format": self.weights_format}
        if self.kind == "distributed":
            out["distributed_files"] = list(self.distributed_files)
        else:
            out["weights"] = [self.shards[key] for key in sorted(self.shards)]
        return out


def detect_layout(names: list[str], label: str) -> ArchiveLayout:
    """The layout implied by an archive's regular-file member names (normalised, no ``./``)."""
    distributed = tuple(n for n in names if n.startswith(DISTRIBUTED_FOLDER + "/"))
    root = [n for n in names if n in WEIGHTS_NAMES]
    ranked: dict[tuple[int, int], str] = {}
    styles = set()
    for name in names:
        folder, _, base = name.partition("/")
        if base not in WEIGHTS_NAMES:
            continue
        if _FSDP.fullmatch(folder):
            raise FormatError(f"{label}: member {name} is an FSDP shard; shardwise does not read FSDP-sharded archives")
        parsed = parse_rank_folder(folder)
        if parsed is None:
            continue
        tp_rank, pp_rank, style = parsed
        styles.add(style)
        if (tp_rank, pp_rank) in ranked:
            raise FormatError(f"{label}: rank folder {folder} holds both {ranked[(tp_rank, pp_rank)]} and {name}")
        ranked[(tp_rank, pp_rank)] = name
    found = [bool(distributed), bool(root), bool(ranked)]
    if sum(found) > 1:
        raise FormatError(f"{label}: the archive mixes weight layouts (root weights, rank folders, model_weights/); cannot tell which to read")
    if distributed:
        return ArchiveLayout("distributed", distributed_files=distributed)
    if root:
        if len(root) > 1:
            raise FormatError(f"{label}: the archive holds both {root[0]} and {root[1]}; cannot tell which to read")
        return ArchiveLayout("single", weights_format=WEIGHTS_NAMES[root[0]], shards={(0, 0): root[0]})
    if not ranked:
        raise FormatError(f"{label}: no model weights in the archive (looked for model_weights.ckpt, model_weights.safetensors, rank folders and model_weights/)")
    if len(styles) > 1:
        raise FormatError(f"{label}: the archive mixes mp_rank_XX and tp_rank_XX_pp_rank_XXX folders")
    formats = {WEIGHTS_NAMES[n.rpartition("/")[2]] for n in ranked.values()}
    if len(formats) > 1:
        raise FormatError(f"{label}: rank folders hold weights of different formats ({', '.join(sorted(formats))})")
    tp, pp, gap = grid_of(ranked)
    if gap is not None:
        base = next(iter(ranked.values())).rpartition("/")[2]
        missing = f"tp_rank_{gap[0]:02d}_pp_rank_{gap[1]:03d}" if styles == {"tp_pp"} else f"mp_rank_{gap[0]:02d}"
        raise FormatError(f"{label}: archive is incomplete: TP={tp}, PP={pp} but {missing}/{base} is missing")
    return ArchiveLayout("sharded", tp, pp, formats.pop(), ranked)


def grid_of(ranks) -> tuple[int, int, tuple[int, int] | None]:
    """(TP, PP) of the smallest grid holding every (tp_rank, pp_rank) in ``ranks``, and the first
    cell of that grid ``ranks`` lacks (None when the grid is complete)."""
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    gap = next(((t, p) for t in range(tp) for p in range(pp) if (t, p) not in ranks), None)
    return tp, pp, gap


def ranks_of_process(rank: int, world_size: int, tp: int, pp: int) -> tuple[int, int]:
    """(tp_rank, pp_rank) of global ``rank`` in Megatron's default order (TP fastest, then DP, then PP).

    >>> ranks_of_process(5, 8, tp=2, pp=2)   # dp=2: ranks 0-3 are stage 0, 4-7 stage 1
    (1, 1)
    """
    if world_size % (tp * pp):
        raise LayoutError(f"a world of {world_size} processes cannot hold TP={tp} x PP={pp}; the size must be a multiple of {tp * pp}")
    dp = world_size // (tp * pp)
    return rank % tp, rank // (tp * dp)
