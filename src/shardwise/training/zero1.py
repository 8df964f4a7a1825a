"""ZeRO-1 optimizer states in memory: merge the DP shards of one (ep, tp, pp) into the full state, split it again.

NxD's ``NeuronZero1Optimizer`` (torch-xla's ``ZeroRedundancyOptimizer``) saves one state dict per
DP rank: ``param_groups``, ``state`` (usually empty), ``base_state`` = ``{param_idx: {"step",
"exp_avg", "exp_avg_sq", ...}}``, ``shape_info`` = ``{param_idx: full local shape}`` and, with
``save_master_weights``, ``sharded_master_weights`` = ``{param_idx: shard}``. Each parameter is
padded with zeros on dim 0 to a multiple of DP and cut into DP equal chunks; rank r keeps chunk r.
With N rows and DP ranks every shard therefore has ``ceil(N / DP)`` rows.

The full state is what NxD's ``nxd_convert_zero_checkpoints --convert_to_full`` writes: the same
dict with every shard tensor replaced by the whole ``shape_info`` shape. Unlike NxD's tool,
``sharded_master_weights`` is merged like ``base_state`` (NxD keeps DP rank 0's shard), shapes
compare as tuples whatever sequence type ``shape_info`` holds (NxD compares a list with a
``torch.Size``), and ``shape_info`` keeps its type (NxD's split turns it into lists).

Every tensor of one or more dimensions under ``base_state[k]`` or ``sharded_master_weights[k]`` must
be a shard of ``shape_info[k]`` (when merging) or have that shape (when splitting); anything else is
a LayoutError rather than a guess, so that ``merge_zero1(split_zero1(full, n)) == full`` and
``split_zero1(merge_zero1(s), len(s)) == s`` (with zero padding in ``s``) hold bit for bit. Scalars
and 0-dim tensors such as ``step`` come from DP rank 0; so does every other key. Dtypes are kept.

Pure functions: no I/O, no torch.distributed; safe to call from any thread on distinct inputs.
"""

from __future__ import annotations

from typing import Any

from ..errors import FormatError, LayoutError
from .assign import tensor_uses

__all__ = ["is_zero1_state", "merge_zero1", "split_zero1", "SHARDED_KEYS"]

SHARDED_KEYS = ("base_state", "sharded_master_weights")  # {param_idx: per-parameter state}, sharded on dim 0


def is_zero1_state(obj: Any) -> bool:
    """True for a ZeRO-1 optimizer state dict (it has ``base_state`` and ``shape_info``)."""
    return isinstance(obj, dict) and isinstance(obj.get("base_state"), dict) and isinstance(obj.get("shape_info"), dict)


def _check_backed(state: dict, source: str) -> None:
    """FormatError unless the tensors of ``state`` declare no more bytes than the storages behind them hold.

    A pickle may describe views that repeat their storage (stride 0), many views of one storage or
    one tensor in many places: a 2 KB file whose merge or split would write GiB, or fail allocating
    them. Real optimizer states hold each tensor's bytes once, so what the input stores bounds what is written.
    """
    stored: dict[int, int] = {}
    declared = 0
    for tensor in tensor_uses(state):  # each place counts: merging and splitting copy each one
        storage = tensor.untyped_storage()
        stored[storage.data_ptr()] = max(stored.get(storage.data_ptr(), 0), storage.nbytes())
        declared += tensor.numel() * tensor.element_size()
    if declared > sum(stored.values()):
        raise FormatError(
            f"{source}: its tensors declare {declared:,} bytes but the file stores {sum(stored.values()):,} "
            f"(views that repeat their storage); refusing to write them out in full"
        )


def _rows(n: int, dp: int) -> int:
    """Rows of each shard of an N-row parameter over ``dp`` ranks (after zero padding to a multiple of ``dp``)."""
    return -(-n // dp)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _shapes(state: dict, source: str) -> dict[Any, tuple[int, ...]]:
    """``shape_info`` with every shape as a tuple of ints (it may hold torch.Size, lists or tuples)."""
    shapes = {}
    for k, shape in state["shape_info"].items():
        if not isinstance(shape, (list, tuple)) or not shape or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"{source}: shape_info[{k!r}] is {shape!r:.60}, not a shape with at least one dimension")
        shapes[k] = tuple(shape)
    return shapes


def _per_param(state: dict, key: str, shapes: dict, source: str) -> dict:
    entries = state.get(key, {})
    if not isinstance(entries, dict):
        raise FormatError(f"{source}: {key} is a {type(entries).__name__}, not a dict of parameter index -> state")
    unknown = [k for k in entries if k not in shapes]
    if unknown:
        raise FormatError(f"{source}: {key} has parameter {unknown[0]!r}, which shape_info does not list")
    return entries


def merge_zero1(shards: list[dict], source: str) -> dict:
    """The full ZeRO-1 state from the states of DP ranks 0..D-1 (``shards``, in DP order).

    ``source`` names the files in error messages. Shard tensors are concatenated on dim 0 and cut
    to ``shape_info[k][0]`` rows (the padding is dropped, whatever it holds); everything else is DP
    rank 0's object. Raises FormatError when a state is not ZeRO-1 or the ranks disagree on keys,
    and LayoutError when a tensor is not a ``ceil(N / D)``-row shard of its ``shape_info`` shape.

    >>> full = merge_zero1([rank0, rank1], "optim/dp_rank_*_tp_rank_00_pp_rank_00.pt")  # doctest: +SKIP
    """
    import torch

    if not shards:
        raise LayoutError(f"{source}: no DP ranks to merge")
    for r, state in enumerate(shards):
        if not is_zero1_state(state):
            raise FormatError(f"{source}: DP rank {r} holds no ZeRO-1 optimizer state (no base_state and shape_info)")
        _check_backed(state, f"{source} (DP rank {r})")
    dp, first = len(shards), shards[0]
    shapes = _shapes(first, source)
    for r, state in enumerate(shards[1:], 1):
        if set(state) != set(first):
            raise FormatError(f"{source}: DP rank {r} has keys {sorted(map(str, state))}, DP rank 0 {sorted(map(str, first))}")
        if _shapes(state, source) != shapes:
            raise FormatError(f"{source}: DP rank {r} has a different shape_info from DP rank 0")

    ep_offset = first.get("ep_base_state_offset")

    def merge(values: list, shape: tuple[int, ...], where: str, expert: bool = False) -> Any:
        head = values[0]
        if isinstance(head, dict):
            for r, value in enumerate(values[1:], 1):
                if not isinstance(value, dict) or set(value) != set(head):
                    raise FormatError(f"{source}: {where} has keys {sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__} on DP rank {r}, {sorted(map(str, head))} on DP rank 0")
            return {name: merge([v[name] for v in values], shape, f"{where}[{name!r}]", expert) for name in head}
        if not (_is_tensor(head) and head.dim() >= 1):
            _refuse_tensor_lists(head, f"{source}: {where}")
            return head
        n, rows = shape[0], _rows(shape[0], dp)
        expected = (rows, *shape[1:])
        for r, value in enumerate(values):
            if not _is_tensor(value) or tuple(value.shape) != expected:
                got = list(value.shape) if _is_tensor(value) else type(value).__name__
                raise LayoutError(
                    f"{source}: {where} on DP rank {r} is {got}, but a shard of shape_info {list(shape)} "
                    f"over DP={dp} has shape {list(expected)} ({rows * dp} padded rows)"
                    + (" (an expert parameter: NeuronEPZero1Optimizer shards those over the expert-data-parallel group, "
                       "which is not supported yet)" if expert else "")
                )
            if value.dtype != head.dtype:
                raise FormatError(f"{source}: {where} is {value.dtype} on DP rank {r} but {head.dtype} on DP rank 0")
        # each rank's rows that fall inside the N real rows; the rest is padding
        return torch.cat([value[: max(0, min(rows, n - r * rows))] for r, value in enumerate(values)])

    full = dict(first)
    for key in SHARDED_KEYS:
        if key in first:
            per_rank = [_per_param(state, key, shapes, source) for state in shards]
            for r, entries in enumerate(per_rank[1:], 1):
                if set(entries) != set(per_rank[0]):
                    raise FormatError(f"{source}: {key} covers parameters {sorted(entries, key=str)} on DP rank {r}, {sorted(per_rank[0], key=str)} on DP rank 0")
            full[key] = {}
            for k in per_rank[0]:
                expert = key == "base_state" and type(ep_offset) is int and type(k) is int and k >= ep_offset
                full[key][k] = merge([entries[k] for entries in per_rank], shapes[k], f"{key}[{k!r}]", expert)
    return full


def split_zero1(full: dict, dp: int, source: str, only: int | None = None) -> list[dict]:
    """The states of DP ranks 0..dp-1 from a full ZeRO-1 state (the inverse of :func:`merge_zero1`);
    with ``only``, the list holds that rank's state alone (the others are not built).

    Each tensor of one or more dimensions under ``base_state[k]`` / ``sharded_master_weights[k]``
    must have shape ``shape_info[k]``; it is zero-padded on dim 0 to a multiple of ``dp`` and rank
    r gets chunk r (a tensor of its own, same dtype). Every other value is shared by all ranks.
    Raises LayoutError for ``dp`` < 1 or a tensor of another shape, FormatError for a state that is not ZeRO-1.

    >>> ranks = split_zero1(full, 4, "optim/full_tp_rank_00_pp_rank_00.pt")  # doctest: +SKIP
    """
    if type(dp) is not int or dp < 1:
        raise LayoutError(f"{source}: cannot split a ZeRO-1 state over DP={dp!r}; DP must be at least 1")
    if not is_zero1_state(full):
        raise FormatError(f"{source}: holds no ZeRO-1 optimizer state (no base_state and shape_info)")
    _check_backed(full, source)
    shapes = _shapes(full, source)
    wanted = range(dp) if only is None else [only]

    def split(value: Any, shape: tuple[int, ...], where: str) -> list:
        if isinstance(value, dict):
            parts = {name: split(v, shape, f"{where}[{name!r}]") for name, v in value.items()}
            return [{name: chunks[i] for name, chunks in parts.items()} for i in range(len(wanted))]
        if not (_is_tensor(value) and value.dim() >= 1):
            _refuse_tensor_lists(value, f"{source}: {where}")
            return [value] * len(wanted)
        if tuple(value.shape) != shape:
            raise LayoutError(f"{source}: {where} is {list(value.shape)}, but shape_info says {list(shape)}; a full state holds whole tensors")
        n, rows = shape[0], _rows(shape[0], dp)
        chunks = []
        for r in wanted:
            chunk = value.new_zeros((rows, *shape[1:]))  # the padding rows stay zero, as NxD pads
            real = value[r * rows: min(n, (r + 1) * rows)]
            chunk[: real.shape[0]] = real
            chunks.append(chunk)
        return chunks

    ranks = [dict(full) for _ in wanted]
    for key in SHARDED_KEYS:
        if key in full:
            entries = _per_param(full, key, shapes, source)
            parts = {k: split(v, shapes[k], f"{key}[{k!r}]") for k, v in entries.items()}
            for i, state in enumerate(ranks):
                state[key] = {k: chunks[i] for k, chunks in parts.items()}
    return ranks


def _refuse_tensor_lists(value: Any, where: str) -> None:
    """Tensors inside lists or tuples cannot be told apart as shards or not: refuse instead of guessing."""
    if isinstance(value, (list, tuple, set)) and any(_is_tensor(v) and v.dim() >= 1 for v in value):
        raise FormatError(f"{where}: holds tensors inside a {type(value).__name__}, which ZeRO-1 conversion does not handle")
