"""Parallel coordinates of the calling rank: who writes and reads which files of a training checkpoint.

A training run tells shardwise where each rank sits through a small protocol, any object with
these attributes (:class:`ParallelCoords` is the plain one):

    tp_rank, tp_size, pp_rank, pp_size, dp_rank, dp_size   ints
    dp_group                                               torch.distributed group of this rank's
                                                           DP replicas, for the caller's gradient
                                                           reductions (checkpoint traffic uses a
                                                           gloo group of its own)

Three ways to get them:

- :func:`initialize_model_parallel` builds Megatron-order groups (TP innermost, then DP, then
  PP) on an initialised default group and remembers them for later saves and loads;
- :func:`from_parallel_state` reads Megatron's or NxD's ``parallel_state`` module;
- :func:`current` returns what was remembered, else pure data parallelism over the whole world
  when torch.distributed is initialised, else the single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import LayoutError

__all__ = ["ParallelCoords", "initialize_model_parallel", "from_parallel_state", "current", "coords_of", "destroy_model_parallel"]


@dataclass(frozen=True)
class ParallelCoords:
    """Where this rank sits in a TP x PP x DP grid (all ranks 0-based, sizes >= 1)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None

    def __post_init__(self) -> None:
        for axis in ("tp", "pp", "dp"):
            rank, size = getattr(self, f"{axis}_rank"), getattr(self, f"{axis}_size")
            if not (isinstance(rank, int) and isinstance(size, int) and size >= 1 and 0 <= rank < size):
                raise LayoutError(f"parallel coordinates: {axis}_rank {rank!r} is not within {axis}_size {size!r}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def is_first_model_rank(self) -> bool:
        """True on the rank that writes what exists once per run (scheduler, user content); the manifest is global rank 0's."""
        return self.tp_rank == 0 and self.pp_rank == 0 and self.dp_rank == 0


_current: ParallelCoords | None = None


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> ParallelCoords:
    """Split the initialised world into TP x PP x DP groups in Megatron's order and remember them.

    Rank r has tp_rank = r % tp, dp_rank = (r // tp) % dp, pp_rank = r // (tp * dp). Every rank
    must call this with the same numbers (group creation is collective). Raises LayoutError
    when the world size is not a multiple of tp * pp, or torch.distributed is not initialised.
    """
    global _current
    dist = _dist()
    if dist is None:
        raise LayoutError("initialize_model_parallel needs torch.distributed initialised first (init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise LayoutError(f"initialize_model_parallel: world size {world} is not a multiple of tp {tp} x pp {pp}")
    dp = world // (tp * pp)
    mine = None
    for stage in range(pp):
        for t in range(tp):
            members = [stage * tp * dp + d * tp + t for d in range(dp)]
            group = dist.new_group(members)  # collective: every rank creates every group
            if rank in members:
                mine = group
    _current = ParallelCoords(rank % tp, tp, rank // (tp * dp), pp, (rank // tp) % dp, dp, mine)
    return _current


def destroy_model_parallel() -> None:
    """Forget the coordinates :func:`initialize_model_parallel` remembered."""
    global _current
    _current = None


def _first(module: Any, *names: str) -> Any:
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn()
    raise LayoutError(f"{getattr(module, '__name__', module)!r} has none of {', '.join(names)}: not a parallel_state module")


def from_parallel_state(parallel_state: Any) -> ParallelCoords:
    """Coordinates from Megatron's ``megatron.core.parallel_state`` or NxD's
    ``neuronx_distributed.parallel_layers.parallel_state`` (their getters, either spelling of sizes)."""
    ps = parallel_state
    return ParallelCoords(
        _first(ps, "get_tensor_model_parallel_rank"),
        _first(ps, "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_size"),
        _first(ps, "get_pipeline_model_parallel_rank"),
        _first(ps, "get_pipeline_model_parallel_world_size", "get_pipeline_model_parallel_size"),
        _first(ps, "get_data_parallel_rank"),
        _first(ps, "get_data_parallel_world_size", "get_data_parallel_size"),
        _first(ps, "get_data_parallel_group"),
    )


def current() -> ParallelCoords:
    """The remembered coordinates, else pure DP over the initialised world, else one process."""
    if _current is not None:
        return _current
    dist = _dist()
    if dist is None:
        return ParallelCoords()
    return ParallelCoords(dp_rank=dist.get_rank(), dp_size=dist.get_world_size(), dp_group=dist.group.WORLD)


def coords_of(parallel: Any) -> ParallelCoords:
    """``parallel`` (None, a ParallelCoords, any object of the protocol, or a parallel_state module) as ParallelCoords.

    Raises LayoutError when the coordinates do not match the initialised world (its size must be
    tp x pp x dp) or when they claim more than one rank without torch.distributed.
    """
    if parallel is None:
        coords = current()
    elif isinstance(parallel, ParallelCoords):
        coords = parallel
    elif hasattr(parallel, "tp_rank"):
        coords = ParallelCoords(
            parallel.tp_rank, parallel.tp_size, parallel.pp_rank, parallel.pp_size, parallel.dp_rank, parallel.dp_size,
            getattr(parallel, "dp_group", None),
        )
    else:
        coords = from_parallel_state(parallel)
    dist = _dist()
    world = dist.get_world_size() if dist is not None else 1
    if coords.world_size != world:
        where = "torch.distributed's world" if dist is not None else "a run without torch.distributed (world 1)"
        raise LayoutError(
            f"parallel coordinates tp {coords.tp_size} x pp {coords.pp_size} x dp {coords.dp_size} = {coords.world_size} ranks "
            f"do not match {where} of {world}"
        )
    return coords
