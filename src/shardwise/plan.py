"""Conversion plans: which tensors go into which output file, with which dtype. Pure, no I/O.

A plan is computed from tensor descriptions alone, so it can be tested with made-up sizes and
shown before anything is written. :mod:`shardwise.engine` executes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import DType, dtype as dtype_row
from .errors import OptionError
from .tensors import TensorInfo

__all__ = ["PlannedTensor", "PlannedFile", "OutputPlan", "OUTPUT_FORMATS", "plan_output", "split_into_shards", "infer_format"]

OUTPUT_FORMATS = ("safetensors", "torch", "hf", "archive", "nxdt", "nemo-dir", "dcp")
HF_DEFAULT_SHARD_SIZE = 50 * 10**9  # save_pretrained's default in transformers 5 ("50GB"; it was "5GB" before)
_SHARD_STEMS = {"safetensors": ("model", ".safetensors", "model.safetensors.index.json"),
                "torch": ("pytorch_model", ".bin", "pytorch_model.bin.index.json")}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its description in the output and the source tensor it comes from.

    ``cast`` is the output dtype name when it differs from the source's, else None (bytes are copied).
    """

    out: TensorInfo
    source_name: str
    cast: str | None = None


@dataclass(frozen=True)
class PlannedFile:
    """One output file (``relpath`` inside the output folder, or "" for a single-file output)."""

    relpath: str
    kind: str  # "safetensors" or "torch"
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.out.nbytes for t in self.tensors)


@dataclass(frozen=True)
class OutputPlan:
    """Everything a conversion writes: weight files, an optional index, and whether the output is a folder."""

    format: str
    is_dir: bool
    files: tuple[PlannedFile, ...]
    index_name: str | None = None
    copy_companions: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def total_elements(self) -> int:
        return sum(t.out.numel for f in self.files for t in f.tensors)

    def weight_map(self) -> dict[str, str]:
        return {t.out.name: f.relpath for f in self.files for t in f.tensors}


def infer_format(dst: str) -> str:
    """The output format a destination name implies (``.safetensors`` or a torch suffix)."""
    lower = dst.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith((".pt", ".pth", ".bin")):
        return "torch"
    if lower.endswith(".nemo"):
        return "archive"
    raise OptionError(f"{dst}: cannot tell the output format from the name; pass --to {{{','.join(OUTPUT_FORMATS)}}}")


def split_into_shards(infos: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Greedy split in the given order: start a new shard when the next tensor would overflow.

    A tensor larger than ``max_bytes`` gets a shard of its own (as in transformers). Not optimal
    bin packing, on purpose: shards keep the source order, so reading stays sequential.

    >>> [[t.name for t in s] for s in split_into_shards([TensorInfo(n, (k,), "uint8") for n, k in
    ...     [("a", 6), ("b", 2), ("c", 2), ("d", 9)]], 8)]
    [['a', 'b'], ['c'], ['d']]
    """
    shards: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    size = 0
    for info in infos:
        if current and size + info.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(info)
        size += info.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _planned(info: TensorInfo, cast: DType | None) -> PlannedTensor:
    if cast is None or not dtype_row(info.dtype).castable or info.dtype == cast.name:
        return PlannedTensor(info, info.name)
    return PlannedTensor(TensorInfo(info.name, info.shape, cast.name), info.name, cast.name)


def plan_output(
    infos: list[TensorInfo],
    *,
    to: str,
    cast: DType | None = None,
    max_shard_size: int | None = None,
) -> OutputPlan:
    """Plan a conversion of ``infos`` into format ``to``.

    - ``safetensors``/``torch`` without ``max_shard_size``: one file at the destination path.
    - with ``max_shard_size``, or ``hf`` (default 50GB, as transformers 5): a folder of HF-named shards
      (``model-00001-of-00003.safetensors``) plus an index when there is more than one shard, else a
      single ``model.safetensors`` (``pytorch_model.bin`` for torch); ``hf`` also copies config and
      tokenizer files.

    ``cast`` converts floating tensors (fp16, bf16, fp32, fp64) to that dtype; integer, bool,
    float8 and complex tensors are copied unchanged.
    """
    if to not in OUTPUT_FORMATS:
        raise OptionError(f"--to {to!r} is not an output format; choose one of {', '.join(OUTPUT_FORMATS)}")
    planned = [_planned(info, cast) for info in infos]
    kind = "torch" if to == "torch" else "safetensors"
    if to != "hf" and max_shard_size is None:
        return OutputPlan(to, False, (PlannedFile("", kind, tuple(planned)),))
    limit = max_shard_size or HF_DEFAULT_SHARD_SIZE
    by_name = {p.out.name: p for p in planned}
    shards = split_into_shards([p.out for p in planned], limit)
    stem, suffix, index_name = _SHARD_STEMS[kind]
    if len(shards) == 1:
        names = [f"{stem}{suffix}"]
        index_name = None
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}" for i in range(len(shards))]
    files = tuple(PlannedFile(name, kind, tuple(by_name[t.name] for t in shard)) for name, shard in zip(names, shards))
    return OutputPlan(to, True, files, index_name, copy_companions=(to == "hf"))
