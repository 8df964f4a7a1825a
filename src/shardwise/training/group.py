"""The processes taking part in a save or a load: one process, or every rank of torch.distributed.

Checkpoint traffic (a staging folder's name, each rank's file list, the outcome) goes over a
gloo group of its own, created by the first save or load on every rank, so that it never
interleaves with the training's collectives and can run from an async save's writer thread.
The leader is global rank 0; it makes the decisions that must be taken once (the tag's name,
the commit) and broadcasts them, errors included, so that every rank returns or raises alike.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

__all__ = ["Group", "checkpoint_group", "first_failure"]

T = TypeVar("T")
_groups: dict[int, Any] = {}


class _Failure:
    """An error on one rank, carried to the others as a message (exceptions may not unpickle elsewhere)."""

    def __init__(self, rank: int, error: BaseException) -> None:
        self.rank = rank
        self.kind = "OSError" if isinstance(error, OSError) else type(error).__name__
        self.message = str(error)


class Group:
    """The ranks of one save or load; all methods are collective (every rank calls them in the same order)."""

    def __init__(self, dist: Any = None, process_group: Any = None) -> None:
        self._dist = dist
        self._pg = process_group
        self.rank = dist.get_rank() if dist else 0
        self.size = dist.get_world_size() if dist else 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def leader_decides(self, decide: Callable[[], T]) -> T:
        """Run ``decide`` on the leader and return its result on every rank; its error is raised on every rank."""
        if self.size == 1:
            return decide()
        box: list[Any] = [None]
        error = None
        if self.is_leader:
            try:
                box[0] = decide()
            except Exception as e:  # raised below on the leader itself, as a message elsewhere
                error, box[0] = e, _Failure(self.rank, e)
        self._dist.broadcast_object_list(box, src=0, group=self._pg)
        if error is not None:
            raise error
        if isinstance(box[0], _Failure):
            raise _as_error(box[0])
        return box[0]

    def gather_outcomes(self, outcome: Any) -> list[Any]:
        """Every rank's ``outcome`` (an exception travels as a message), in rank order, on every rank."""
        if isinstance(outcome, BaseException):
            outcome = _Failure(self.rank, outcome)
        if self.size == 1:
            return [outcome]
        out: list[Any] = [None] * self.size
        self._dist.all_gather_object(out, outcome, group=self._pg)
        return out


def _as_error(failure: _Failure) -> Exception:
    text = f"rank {failure.rank}: {failure.message}"
    return OSError(text) if failure.kind == "OSError" else _REBUILT.get(failure.kind, RuntimeError)(text)


def first_failure(outcomes: list[Any]) -> Exception | None:
    """The first rank's error among gathered outcomes, as an exception to raise, or None."""
    for outcome in outcomes:
        if isinstance(outcome, _Failure):
            return _as_error(outcome)
    return None


def _error_classes() -> dict[str, type]:
    from .. import errors

    return {name: getattr(errors, name) for name in errors.__all__}


_REBUILT = _error_classes()


def checkpoint_group() -> Group:
    """The Group of this process: torch.distributed's world over a dedicated gloo group, or just this process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Group()
    key = id(dist.group.WORLD)
    if key not in _groups:
        _groups.clear()  # a new world: groups of an earlier one are gone
        _groups[key] = dist.new_group(backend="gloo")
    return Group(dist, _groups[key])
